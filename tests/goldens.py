"""The golden losses of each family's tiny seeded runs: the adapter run (train_network) and the full fine-tune
(train_db, the sections of conftest.FULL_FINE_TUNE; SDXL's its own). The family's test module checks them, the test
device (test_device.py) checks them again, and the tests of variants (quantized base, T5 options, sampling)
compare their losses with them. Only a change of what training computes changes them."""

# SD1: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px
GOLDEN_SD1 = [1.021639, 1.195059, 1.198248, 1.110815]

# SDXL: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, U-Net + both text encoders
GOLDEN_SDXL = [0.930762, 1.134166, 1.129562, 1.087542]
# seed 7, 8 images, batch 2, Adafactor lr 1e-4 with fused backward pass, U-Net + both text encoders
GOLDEN_SDXL_DB = [0.935621, 1.126822, 1.109372, 1.055432]

# SD3: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer + CLIP-L + CLIP-G adapters, T5 16 tokens,
# sd-scripts' SD3 defaults (uniform u, training shift 1.0, x_0 preconditioning, no weighting)
GOLDEN_SD3 = [0.192501, 1.759073, 2.258059, 1.118095]
GOLDEN_SD3_DB = [0.055859, 1.752957, 2.199689, 1.127642]

# FLUX.1: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer + CLIP-L adapters, T5 16 tokens, sd-scripts
# defaults
GOLDEN_FLUX = [0.491824, 0.851382, 0.774685, 0.529203]
GOLDEN_FLUX_DB = [0.441010, 0.825962, 0.755955, 0.516878]

# FLUX.2 klein: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer adapters, sd-scripts' FLUX defaults
GOLDEN_FLUX2 = [3.542257, 3.090285, 2.467133, 1.963594]
GOLDEN_FLUX2_DB = [3.433707, 3.119931, 2.455278, 1.849790]

# Chroma: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer adapters, T5 16 tokens, sd-scripts defaults
GOLDEN_CHROMA = [0.516216, 0.935634, 0.815975, 0.527397]
GOLDEN_CHROMA_DB = [0.505084, 0.910699, 0.786815, 0.530564]

# Qwen-Image: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer adapters, qwen_shift timesteps, raw velocity
GOLDEN_QWEN = [1.457694, 1.516494, 1.460373, 1.454096]
GOLDEN_QWEN_DB = [1.457694, 1.514447, 1.455348, 1.444663]

# Z-Image: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, transformer adapters, shift 3.0, raw velocity
GOLDEN_ZIMAGE = [1.458288, 1.596867, 1.462682, 1.524626]
GOLDEN_ZIMAGE_DB = [0.758990, 1.588003, 1.422201, 1.512625]

# Anima: seed 7, dim 4, alpha 2, batch 2, lr 1e-3, 64px, the DiT blocks' attention and MLP, sigmoid sampling, raw
# velocity
GOLDEN_ANIMA = [1.596537, 1.806136, 1.640153, 1.606024]
GOLDEN_ANIMA_DB = [1.596537, 1.800808, 1.626940, 1.583722]
