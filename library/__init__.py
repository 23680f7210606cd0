"""Everything the recipes are made of. No module here imports a recipe."""
