"""`python -m library.tiny <what> <out>`: see library/tiny/__init__.py."""
import os

from library.tiny import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
main()
