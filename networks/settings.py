"""What the config says about the adapter, read the way sd-scripts and LyCORIS users write it.

Every option can be a typed key of [network] or a "key=value" string of `network_args`, as in
sd-scripts (`network_module = "lycoris.kohya"`, `network_args = ["algo=loha", "conv_dim=4"]`);
setting one both ways with different values is an error. This module imports no torch, so the
config is checked before any model or library loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("lora", "locon", "loha", "lokr", "oft", "boft", "dora")
LORA_FAMILY = ("lora", "locon", "dora")  # one peft LoraConfig; dora adds the magnitude vector
ROTATIONS = ("oft", "boft")  # output rotations (networks/oft.py), not additive
MODULES = ("networks.lora", "lycoris.kohya")
NUM_BLOCKS, NUM_UPDOWN = 25, 12  # kohya's SD1/SD2 U-Net blocks: IN00-IN11, MID, OUT00-OUT11
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
# LyCORIS' presets (lycoris.kohya `preset=`): (text encoders adapted, which denoiser layers, 3x3 convs adapted).
# Denoiser layers: "default" (the family's linear and, with convs, conv parents), "transformer" (linear parents
# only), "attention" (layers inside attention modules), "convblock" (conv parents only); text encoders:
# "default" (attention and MLP), "attention", or None. LyCORIS' convs default to network_dim's rank.
PRESETS: dict[str, tuple[str | None, str, bool]] = {
    "full": ("default", "default", True),
    "unet-only": (None, "default", True),
    "attn-mlp": ("default", "transformer", False),
    "attn-only": ("attention", "attention", False),
    "unet-transformer-only": (None, "transformer", False),
    "unet-convblock-only": (None, "convblock", True),
}

# network_args key -> [network] key, where the names differ
ARG_NAMES = {"dropout": "network_dropout", "dora_wd": "dora_wd"}
ARG_KEYS = ("algo", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "factor",
            "decompose_both", "use_tucker", "dora_wd", "wd_on_output", "constraint", "use_ema", "ema_decay", "block_dims", "block_alphas", "conv_block_dims",
            "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "loraplus_lr_ratio",
            "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "preset", "train_blocks",
            "train_double_block_indices", "train_single_block_indices", "train_llm_adapter")


class SettingsError(ValueError):
    """An impossible adapter configuration; the config loader turns it into a ConfigError."""


@dataclass(frozen=True)
class NetworkSettings:
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    algo: str = "lora"
    module: str = "networks.lora"
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    down_lr_weight: tuple[float, ...] | None = None
    mid_lr_weight: float | None = None
    up_lr_weight: tuple[float, ...] | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    constraint: float = 0.0  # OFT / BOFT: the norm limit of Q, as UIs read the file's alpha (0: none)
    use_ema: bool = False  # train_network.py: also save an EMA of the adapter weights (networks/ema.py)
    ema_decay: float = 0.999
    preset: str = "full"  # LyCORIS' layer preset (PRESETS); networks.lora ignores it, as sd-scripts' does
    # sd-scripts' lora_flux: which kinds of block ("all", "double", "single") and which block indices of each
    # kind (None: all) get adapters; read from the layers' kohya names (double_blocks.N. / single_blocks.N.)
    train_blocks: str = "all"
    double_blocks: frozenset[int] | None = None
    single_blocks: frozenset[int] | None = None
    # sd-scripts' lora_anima: adapters in the LLM adapter's blocks too (a family target's llm_adapter_path)
    train_llm_adapter: bool = False

    @classmethod
    def from_network_section(cls, net) -> "NetworkSettings":
        """Typed keys and network_args merged, checked (SettingsError names the key)."""
        return settings_from(_merged_options(net))

    @property
    def is_lora(self) -> bool:
        return self.algo in LORA_FAMILY

    def adapts(self, component: str) -> bool:
        """Whether the preset puts adapters into this component ("denoiser" or a text encoder's name)."""
        return component == "denoiser" or PRESETS[self.preset][0] is not None

    def as_args(self) -> dict[str, str]:
        """ss_network_args of the file metadata: strings, as sd-scripts / LyCORIS write them."""
        args: dict[str, str] = {}
        if self.module == "lycoris.kohya" or self.algo not in ("lora", "locon"):
            args["algo"] = "lora" if self.algo == "dora" else self.algo
        if self.algo == "dora":
            args.update(dora_wd="True", wd_on_output="False")  # LyCORIS' name for the input-axis form
        if self.conv_dim:
            args.update(conv_dim=str(self.conv_dim), conv_alpha=str(self.conv_alpha))
        for name in ("rank_dropout", "module_dropout"):
            if getattr(self, name):
                args[name] = str(getattr(self, name))
        if self.algo == "lokr":
            args.update(factor=str(self.factor), decompose_both=str(self.decompose_both))
        if self.algo in ROTATIONS:
            args["constraint"] = f"{self.constraint:g}"
        if self.use_tucker:
            args["use_tucker"] = "True"
        if self.preset != "full":
            args["preset"] = self.preset
        if self.train_blocks != "all":
            args["train_blocks"] = self.train_blocks
        for kind in ("double", "single"):
            chosen = getattr(self, f"{kind}_blocks")
            if chosen is not None:
                args[f"train_{kind}_block_indices"] = ",".join(map(str, sorted(chosen))) or "none"
        for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                     "up_lr_weight"):
            if getattr(self, name) is not None:
                args[name] = ",".join(f"{v:g}" for v in getattr(self, name))
        if self.mid_lr_weight is not None:
            args["mid_lr_weight"] = f"{self.mid_lr_weight:g}"
        if self.train_llm_adapter:
            args["train_llm_adapter"] = "True"
        return args


def _merged_options(net) -> dict:
    """{name: value} from the typed keys of [network] and its network_args, conflicts refused."""
    from library.config import parse_kv_args

    args = parse_kv_args([a for a in net.network_args if "=" in a])
    unknown = sorted(set(args) - set(ARG_KEYS))
    if unknown:
        raise SettingsError(f"'network.network_args': {unknown[0]!r} is not supported here "
                            f"(supported: {', '.join(ARG_KEYS)})")
    # alpha 0 means alpha = dim (no scaling), as in sd-scripts' LoRA modules
    options = {"module": net.network_module, "dim": net.network_dim,
               "alpha": float(net.network_alpha) or float(net.network_dim)}
    for arg in ARG_KEYS:
        typed = getattr(net, ARG_NAMES.get(arg, arg), None)
        if arg in args and typed is not None and _normal(args[arg]) != _normal(typed):
            raise SettingsError(f"'network.{ARG_NAMES.get(arg, arg)}' = {typed!r} and network_args "
                                f"'{arg}={args[arg]}' disagree; set it one way")
        value = typed if typed is not None else args.get(arg)
        if value is not None:
            options[arg] = value
    ratio = options.pop("loraplus_lr_ratio", None)
    for part in ("unet", "text_encoder"):
        options.setdefault(f"loraplus_{part}_lr_ratio", ratio)
    return options


def _normal(value):
    if isinstance(value, str):
        text = value.strip().lower()
        return {"true": True, "false": False}.get(text, text.replace(" ", ""))
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in value)
    return value


def settings_from(o: dict) -> NetworkSettings:
    algo = str(o.get("algo") or ("lora" if o["module"] == "networks.lora" else "locon")).lower()
    if algo not in ALGORITHMS:
        raise SettingsError(f"'network.algo' = {algo!r} is not one of: {', '.join(ALGORITHMS)}")
    if _flag(o.get("dora_wd")):
        if algo not in ("lora", "locon", "dora"):
            raise SettingsError(f"'dora_wd' (DoRA) exists for lora/locon only in peft, not for algo={algo}")
        algo = "dora"
    if algo == "dora" and o.get("wd_on_output") is not None and _flag(o.get("wd_on_output")):
        raise SettingsError("'wd_on_output=True' (LyCORIS' output-axis DoRA) is not trained here: UIs render "
                            "only the input-axis form exactly (networks/dora.py); drop wd_on_output")
    conv_dim = _int(o, "conv_dim")
    block_dims = _ints(o, "block_dims", NUM_BLOCKS)
    s = NetworkSettings(
        dim=o["dim"], alpha=o["alpha"], conv_dim=conv_dim or None,
        conv_alpha=(_float(o, "conv_alpha", 1.0) or float(conv_dim)) if conv_dim else None,
        dropout=_float(o, "dropout", None) or None, algo=algo, module=o["module"],
        rank_dropout=_float(o, "rank_dropout", 0.0), module_dropout=_float(o, "module_dropout", 0.0),
        factor=_int(o, "factor") or -1, decompose_both=_flag(o.get("decompose_both")),
        use_tucker=_flag(o.get("use_tucker")), block_dims=block_dims,
        block_alphas=_floats(o, "block_alphas", NUM_BLOCKS), conv_block_dims=_ints(o, "conv_block_dims", NUM_BLOCKS),
        conv_block_alphas=_floats(o, "conv_block_alphas", NUM_BLOCKS),
        down_lr_weight=_lr_weights(o, "down_lr_weight"), mid_lr_weight=_float(o, "mid_lr_weight", None),
        up_lr_weight=_lr_weights(o, "up_lr_weight"),
        loraplus_unet_lr_ratio=_float(o, "loraplus_unet_lr_ratio", None),
        loraplus_text_encoder_lr_ratio=_float(o, "loraplus_text_encoder_lr_ratio", None),
        constraint=_float(o, "constraint", 0.0), use_ema=_flag(o.get("use_ema")),
        ema_decay=_float(o, "ema_decay", 0.999), preset=_preset(o), train_blocks=_train_blocks(o),
        double_blocks=block_selection(o, "train_double_block_indices"),
        single_blocks=block_selection(o, "train_single_block_indices"),
        train_llm_adapter=_flag(o.get("train_llm_adapter")))
    check(s)
    return s


def _preset(o: dict) -> str:
    """LyCORIS' preset name; sd-scripts' networks.lora does not read it (full: every default layer)."""
    name = str(o.get("preset") or "full").strip().lower()
    if name not in PRESETS:
        raise SettingsError(f"'preset' = {name!r} is not one of: {', '.join(PRESETS)} (preset files are not "
                            f"offered: name the layers with a preset)")
    return name if o["module"] == "lycoris.kohya" else "full"


def _train_blocks(o: dict) -> str:
    name = str(o.get("train_blocks") or "all").strip().lower()
    if name not in ("all", "double", "single"):
        raise SettingsError(f"'train_blocks' = {name!r} is not one of: all, double, single")
    return name


def block_selection(o: dict, key: str) -> frozenset[int] | None:
    """sd-scripts' block selection: "all" (None), "none" or "" (no block), or indices and inclusive ranges,
    "0,1,8-12"."""
    text = o.get(key)
    if text is None:
        return None
    text = str(text).strip().lower()
    if text == "all":
        return None
    chosen: set[int] = set()
    try:
        for part in ([] if text in ("none", "") else text.split(",")):
            start, _, end = part.partition("-")
            first, last = int(start), int(end or start)
            if not 0 <= first <= last:
                raise ValueError
            chosen.update(range(first, last + 1))
    except ValueError:
        raise SettingsError(f"'{key}' = {o.get(key)!r}: write all, none, or indices and ranges such as "
                            f"0,1,8-12") from None
    return frozenset(chosen)


def check(s: NetworkSettings) -> None:
    """Combinations peft or the file formats cannot do, refused with the reason."""
    if s.constraint < 0 or s.constraint and s.algo not in ROTATIONS:
        raise SettingsError(f"'constraint' = {s.constraint:g} is OFT / BOFT's norm limit (>= 0), not for algo={s.algo}")
    if s.algo in ROTATIONS and (s.block_dims or s.block_alphas):
        raise SettingsError(f"block_dims / block_alphas set ranks, which algo={s.algo} does not have "
                            f"(network_dim is its block size)")
    if s.use_tucker and s.algo not in ("loha", "lokr"):
        raise SettingsError(f"'use_tucker' exists in peft for loha and lokr only, not for algo={s.algo}")
    plus = s.loraplus_unet_lr_ratio or s.loraplus_text_encoder_lr_ratio
    if plus and not s.is_lora:
        raise SettingsError(f"LoRA+ (loraplus_lr_ratio) scales the lr of LoRA's up matrices; algo={s.algo} "
                            f"has none (use lora, locon or dora)")
    if s.block_alphas and not s.block_dims or s.conv_block_alphas and not s.conv_block_dims:
        raise SettingsError("block_alphas / conv_block_alphas need block_dims / conv_block_dims")
    if not 0.0 < s.ema_decay < 1.0:
        raise SettingsError(f"'ema_decay' = {s.ema_decay:g} must be in (0, 1)")
    if s.algo == "dora" and (s.rank_dropout or s.module_dropout):
        raise SettingsError("rank_dropout / module_dropout with algo=dora are refused: DoRA rescales the base "
                            "weight too, so skipping the low-rank part does not skip the adapter")
    for name in ("dropout", "rank_dropout", "module_dropout"):
        value = getattr(s, name) or 0.0
        if not 0.0 <= value < 1.0:
            raise SettingsError(f"'{name}' = {value} must be in [0, 1)")


def _flag(value) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true") or value == 1


def _int(o: dict, key: str) -> int | None:
    value = o.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SettingsError(f"'{key}' must be an integer, got {value!r}")
    return int(value)


def _float(o: dict, key: str, default):
    value = o.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"'{key}' must be a number, got {value!r}")
    return float(value)


def _numbers(o: dict, key: str, count: int, kind) -> tuple | None:
    value = o.get(key)
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        numbers = tuple(kind(float(str(v).strip())) for v in items)
    except ValueError:
        raise SettingsError(f"'{key}' must be {count} comma-separated numbers, got {value!r}") from None
    if len(numbers) != count:
        raise SettingsError(f"'{key}' has {len(numbers)} values; SD1/SD2 U-Nets have {count} "
                            f"({'IN00-IN11, MID, OUT00-OUT11' if count == NUM_BLOCKS else 'one per block'})")
    return numbers


def _ints(o, key, count):
    return _numbers(o, key, count, int)


def _floats(o, key, count):
    return _numbers(o, key, count, float)


def _lr_weights(o: dict, key: str) -> tuple[float, ...] | None:
    """12 numbers, or a preset name as sd-scripts has them (cosine, sine, linear, reverse_linear,
    zeros), optionally "+offset"."""
    value = o.get(key)
    if not isinstance(value, str) or value.split("+")[0].strip() not in LR_PRESETS:
        return _numbers(o, key, NUM_UPDOWN, float)
    name, _, offset = value.partition("+")
    return lr_preset(name.strip(), float(offset or 0.0))


def lr_preset(name: str, offset: float) -> tuple[float, ...]:
    """The same 12 weights for down and up blocks, as sd-scripts computes them."""
    n = NUM_UPDOWN
    weights = {"cosine": [math.sin(math.pi * i / (n - 1) / 2) for i in range(n)][::-1],
               "sine": [math.sin(math.pi * i / (n - 1) / 2) for i in range(n)],
               "linear": [i / (n - 1) for i in range(n)],
               "reverse_linear": [i / (n - 1) for i in range(n)][::-1],
               "zeros": [0.0] * n}[name]
    return tuple(w + offset for w in weights)


def wants_llm_adapter(net) -> bool:
    """Whether [network] asks for adapters in the LLM adapter (network_args train_llm_adapter=True)."""
    try:
        return NetworkSettings.from_network_section(net).train_llm_adapter
    except SettingsError:
        return False  # check_network_section names the problem


def check_network_section(net, save_format: str = "kohya") -> list[str]:
    """Problems of [network] as ConfigError lines (called by library.config before any model loads)."""
    try:
        s = NetworkSettings.from_network_section(net)
    except SettingsError as e:
        return [f"'network': {e}"]
    problems = []
    if net.scale_weight_norms is not None and (s.algo in ROTATIONS or net.scale_weight_norms <= 0):
        problems.append(f"'network.scale_weight_norms' needs a positive limit and an additive algorithm "
                        f"(lora, locon, dora, loha, lokr), got {net.scale_weight_norms} with algo={s.algo}")
    return problems
