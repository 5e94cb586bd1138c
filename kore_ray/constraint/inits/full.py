"""Full fine-tuning: no adapter, every parameter trained."""


def build(model, method, groups, store, rank, match_kore=False):
    for p in model.parameters():
        p.requires_grad_(True)
    return model
