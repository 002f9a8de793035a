"""The split: a model's ordered units (embedding, blocks, head), found by watching it run, and their groups."""
