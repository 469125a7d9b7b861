"""`python -m llama_export`: the llama-export command."""

import sys

from llama_export.exporter.cli import main

if __name__ == "__main__":
    sys.exit(main())
