"""Recipes: end-to-end fine-tuning on top of the engine and the ``transformers`` integration.

``Recipe(TrainRecipeConfig(...)).run()`` is ``hiftune train`` without the command line:

* :mod:`.config`: :class:`~.config.TrainRecipeConfig`, config files, resume merging;
* :mod:`.models`: offline presets, local model directories, GGUF conversion;
* :mod:`.data`: the bundled sentiment task, user files, prompt formats, collators;
* :mod:`.tasks`: per-task encoding, loss and metrics;
* :mod:`.callbacks`: progress bar, per-step log, Ctrl-C handling;
* :mod:`.report`: ``report.json``, ``report.md`` and plots of a finished run;
* :mod:`.train`: :class:`~.train.Recipe`, the run itself.

Nothing is imported here, so that reading the configuration does not load ``transformers``.
"""
