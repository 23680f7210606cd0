"""Everything the recipes are made of. No module here imports a recipe."""
import logging as _logging

# bitsandbytes warns on import, on CPU-only machines, about an optional kernel package; not about this run.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
