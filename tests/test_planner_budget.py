"""--vram_budget: the switch search on the tiny SD1 model. What it prints must be true: the config lines it
says to add, added to the config, give a plan whose card total fits the budget less the margin; one switch
fewer does not fit; nothing fitting and fitting as configured are said plainly; a card without bf16 is
offered fp16."""
from __future__ import annotations

import dataclasses

import pytest
import toml

import train_network
from library import planner
from library.planner import GIB, plan, search_budget, settings_from_config
from library.planner.budget import _ladder
from library.planner.card import Card, margin


def _config_with(make_config, lines: list[str], **extra):
    """The test config plus the planner's suggested lines ('key = value   # [section]')."""
    sections: dict[str, dict] = {"model": {"family": "sd1"}}
    for line in lines:
        assignment, _, section = line.partition("#")
        section = section.strip().strip("[]")
        sections.setdefault(section, {}).update(toml.loads(assignment))
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    cfg = make_config(**sections)
    cfg.model.arch = cfg.model.pretrained_model_name_or_path  # the tiny model's configs are the architecture
    return cfg


@pytest.fixture
def as_configured(make_config):
    cfg = _config_with(make_config, [])
    return settings_from_config(cfg, "network")


def _budget_for(card_bytes: float) -> float:
    """The budget (GiB) whose limit (budget less margin) is `card_bytes`."""
    budget = card_bytes / (1 - 0.05) / GIB
    assert margin(int(budget * GIB)) == int(budget * GIB * 0.05)
    return budget


def test_suggested_lines_fit_and_one_fewer_does_not(make_config, as_configured):
    first = plan(as_configured, fake=False).card_peak
    everything = search_budget(as_configured, 1e-9, say=lambda _: None, fake=False)
    assert everything is None  # nothing fits in a few bytes
    lowest = min(plan(dataclasses.replace(as_configured, **changes), fake=False).card_peak
                 for changes in ({"mixed_precision": "bf16", "gradient_checkpointing": True, "cache_latents": True},))
    assert lowest < first
    budget = _budget_for((first + lowest) / 2)
    found = search_budget(as_configured, budget, say=lambda _: None, fake=False)
    assert found is not None
    found_plan, lines, costs = found
    limit = budget * GIB - margin(budget * GIB)
    assert lines and len(costs) >= 1 and found_plan.card_peak <= limit
    # the printed lines, put into the config, give the same plan
    again = plan(settings_from_config(_config_with(make_config, lines), "network"), fake=False)
    assert again.card_peak == found_plan.card_peak
    # the search stops at the first rung that fits: one rung fewer did not fit
    rungs = _ladder(as_configured)[:len(costs)]
    assert [f"{name}: {cost}" for name, _, _, cost in rungs] == costs
    one_fewer = as_configured
    for _, changes, _, _ in rungs[:-1]:
        one_fewer = dataclasses.replace(one_fewer, **changes)
    assert plan(one_fewer, fake=False).card_peak > limit


def test_a_card_without_bf16_is_offered_fp16(as_configured):
    old = Card(name="a Turing card", capability=(7, 5), bf16=False)
    names = [name for name, _, _, _ in _ladder(as_configured, old)]
    assert "fp16" in names and "bf16" not in names and "full_bf16" not in names
    assert "bf16" in [name for name, _, _, _ in _ladder(as_configured)]


def test_cli_budget_outcomes(make_config, tmp_path, capsys, monkeypatch, as_configured):
    cfg = _config_with(make_config, [])
    path = tmp_path / "budget.toml"
    path.write_text(toml.dumps(cfg.to_toml_dict()))
    roomy = plan(as_configured).card_peak * 2 / GIB
    assert train_network.main(["--config", str(path), "--vram_budget", f"{roomy:.6f}"]) == 0
    assert "fits as configured" in capsys.readouterr().out
    monkeypatch.setattr(planner, "search_budget", lambda *a, **k: None)  # (a real miss: the test above)
    assert train_network.main(["--config", str(path), "--vram_budget", "0.000001"]) == 1
    assert "nothing fits in 1e-06 GiB" in capsys.readouterr().out


def test_plan_on_a_present_card_that_is_too_small_searches_what_it_supports(make_config, monkeypatch, capsys,
                                                                           as_configured):
    """--plan without a budget on a machine with a card: the card's memory is the budget, and a card without
    bf16 is offered fp16 (torch.cuda is faked: this machine has no card)."""
    from library.planner import card as card_module

    first = plan(as_configured).card_peak
    small = Card(name="a small Turing card", total=int(first * 0.99 / 0.95), capability=(7, 5), bf16=False)
    monkeypatch.setattr(card_module, "present_card", lambda: small)
    cfg = _config_with(make_config, [])
    assert planner.run(cfg, "network") == 0
    out = capsys.readouterr().out
    assert "this does not fit a small Turing card" in out
    assert 'mixed_precision = "fp16"' in out and "bf16" not in out.split("add to the config:")[1]


def test_quantized_base_is_the_last_rung_for_adapters_only(make_config, as_configured, monkeypatch):
    """When fp8_base (and block swap) are not enough, an adapter recipe is offered base_model_precision int8,
    then nf4, replacing fp8_base (a config cannot have both); the lines load as a config that passes the
    checks. Full fine-tunes and adapters that read the base weight (DoRA) are not offered it."""
    from types import SimpleNamespace

    from library.planner import budget

    names = [name for name, _, _, _ in _ladder(as_configured)]
    assert names[-3:] == ["fp8_base", "base_model_precision int8", "base_model_precision nf4"]
    assert not [n for n, _, _, _ in _ladder(dataclasses.replace(as_configured, recipe="db")) if "precision" in n]
    dora = dataclasses.replace(as_configured, network=dataclasses.replace(as_configured.network, dora_wd=True))
    assert not [n for n, _, _, _ in _ladder(dora) if "precision" in n]
    # a plan that fits only with nf4: the search's lines set nf4 and no longer fp8_base (which it had added)
    monkeypatch.setattr(budget, "plan", lambda s, **_: SimpleNamespace(
        card_peak=GIB if s.base_model_precision == "nf4" else 10 * GIB))
    _, lines, costs = search_budget(as_configured, 2, say=lambda _: None)
    assert lines[-1] == 'base_model_precision = "nf4"   # [model]' and costs[-1].startswith("base_model_precision nf4")
    assert not [x for x in lines if x.startswith(("fp8_base", 'base_model_precision = "int8"'))]
    s = settings_from_config(_config_with(make_config, lines), "network")
    assert (s.base_model_precision, s.fp8_base, s.optimizer_type) == ("nf4", False, "AdamW8bit")
    # a user's own fp8_base is turned off by a line
    user = dataclasses.replace(as_configured, fp8_base=True)
    assert _ladder(user)[-2][2] == ['base_model_precision = "int8"   # [model]', "fp8_base = false   # [train]"]


# The headline workloads (README, Memory planner): batch 1, sampling during training, LoRA dim 16; the switches
# every row starts with (what a user of the peers' low-memory recipes sets) and the goal in GiB on the card. Each
# row starts from the README row's switches, so that the large models plan once (their answer: fits as
# configured, checked against the goal less the margin); the search's own steps are shown on the two SD1.5 rows
# (samples in tiles for the LoRA, the optimizer state in CPU memory for DreamBooth), its last rungs (the quantized
# base) by test_quantized_base_is_the_last_rung_for_adapters_only.
_TILES = {"sample_tiled_vae": True}
_LORA = dict(recipe="network", mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
             cache_text_encoder_outputs=True, train_text_encoder=False, optimizer_type="AdamW8bit")
_FULL = dict(recipe="db", mixed_precision="bf16", full_bf16=True, gradient_checkpointing=True, cache_latents=True,
             cache_text_encoder_outputs=True, train_text_encoder=False, optimizer_type="Adafactor",
             fused_backward_pass=True)
HEADLINE = [  # name, family, arch, size, switches, goal, the lines --vram_budget adds
    ("SD1.5 full DreamBooth", "sd1", "sd15", 512, {**_FULL, **_TILES}, 4,  # Adafactor's state leaves the card
     ["offload_optimizer_state = true   # [optimizer]"]),
    ("SD1.5 LoRA", "sd1", "sd15", 512, _LORA, 3, ["sample_tiled_vae = true   # [sample]"]),
    ("SDXL LoRA", "sdxl", "sdxl", 1024, {**_LORA, **_TILES, "fp8_base": True}, 6, []),
    ("SDXL full", "sdxl", "sdxl", 1024, {**_FULL, **_TILES}, 10, []),
    ("SD3-medium LoRA", "sd3", "sd3-medium", 1024, {**_LORA, **_TILES, "t5xxl_precision": "fp8"}, 8, []),
    ("FLUX.1-dev LoRA", "flux", "flux-dev", 1024, {**_LORA, **_TILES, "t5xxl_precision": "fp8", "fp8_base": True,
                                                   "blocks_to_swap": 38}, 8, []),
    ("FLUX.1-dev full", "flux", "flux-dev", 1024, {**_FULL, **_TILES, "t5xxl_precision": "fp8", "blocks_to_swap": 28},
     16, []),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, family, arch, size, switches, goal, expected", HEADLINE, ids=[h[0] for h in HEADLINE])
def test_vram_budget_fits_each_headline_workload(name, family, arch, size, switches, goal, expected):
    """--vram_budget GOAL on the full-size architecture (fake tensors), sampling during training included: the
    lines it suggests and a plan whose card total is at most the goal less the margin (SD1.5 DreamBooth with
    its optimizer state in CPU memory: README, Memory planner)."""
    from library.config import NetworkSection
    from library.planner.step import StepSettings

    s = StepSettings(family=family, arch=arch, width=size, height=size, batch_size=1, sample=True,
                     network=NetworkSection(network_dim=16, network_alpha=16), **switches)
    p, lines, _ = search_budget(s, goal, say=lambda _: None)
    assert lines == expected
    assert set(lines) <= {line for _, _, add, _ in _ladder(s) for line in add}  # the ladder's own lines
    assert p.card_peak <= goal * GIB - margin(goal * GIB)
