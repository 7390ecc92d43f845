"""Training of xCos, one module per job: `config` (TrainConfig and its flags), `factory`
(strategy, backbone, model, optimizers), `inputs` (datasets and feature caches), `loop` (the one
training step and `train`), `evaluator`, `in_graph_teacher`, `run_folder` (params, checkpoints,
`load_trainer`). `python -m xcos_tf.train` is the command line over them.

Nothing is imported here, so `xcos_tf.export` can import `run_folder` without the loop.
"""
