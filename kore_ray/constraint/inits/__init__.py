"""One module per initialisation, each with `build(model, method, groups, store, rank, match_kore)`
returning the model to train (the base modified in place). `adapters.build_method` is the one
dispatch, through the method table (kore_ray/methods.py)."""
