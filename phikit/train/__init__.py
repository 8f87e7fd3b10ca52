"""Training library: optimizer groups and schedules, losses, the mixture data sampler, training checkpoints.

Recipes (phikit/recipes/) import these; nothing here imports a recipe.
"""
