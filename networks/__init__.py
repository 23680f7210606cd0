"""Adapters: which layers each family exposes to them, peft configs, and file formats."""
