"""Recipes: one readable script each (setup, loop, save) with main(argv), run as `phikit <name>`."""
