"""A toy image world (16x16 coloured shapes with 7-word captions) small enough to train few-step models on a CPU."""
