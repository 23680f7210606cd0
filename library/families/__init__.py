"""Model families, one module each; importing this package registers them all."""
from library.families import sd1  # noqa: F401
from library.families.base import Components, ModelSource, get_family  # noqa: F401
