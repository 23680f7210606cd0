"""Model families, one module each; importing this package registers them all."""
# Registration order is the order `family = "auto"` asks: the more specific families first (an SDXL
# folder without model_index.json would otherwise look like SD1's).
from library.families import flux2  # noqa: F401, I001  (FLUX.2 files have FLUX.1's block names)
from library.families import chroma  # noqa: F401, I001  (Chroma files have FLUX.1's block names)
from library.families import flux  # noqa: F401, I001  (BFL single files would look like SD1's)
from library.families import qwen_image  # noqa: F401, I001
from library.families import sd3  # noqa: F401, I001  (SAI SD3 files would look like SD1's)
from library.families import zimage  # noqa: F401, I001  (Z-Image files would look like SD1's)
from library.families import sdxl  # noqa: F401, I001
from library.families import sd1  # noqa: F401
from library.families.base import Components, ModelSource, get_family  # noqa: F401
