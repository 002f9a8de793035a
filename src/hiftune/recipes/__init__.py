"""Recipes: end-to-end fine-tuning on top of the engine and the ``transformers`` integration.

``Recipe(TrainRecipeConfig(...)).run()`` is ``hiftune train`` without the command line:

* :mod:`.config`: :class:`~.config.TrainRecipeConfig`, config files, resume merging;
* :mod:`.arguments`: every ``TrainingArguments`` option, with hiftune's aliases and defaults;
* :mod:`.models`: offline presets, local model directories, Hub ids, GGUF conversion;
* :mod:`.sources`: the user's data through ``datasets`` (files, directories, Hub ids), splits;
* :mod:`.examples`: the run's examples (the demo's subsets, or the user's data whole);
* :mod:`.data`: the bundled sentiment task, labels, prompt formats, collators;
* :mod:`.chat`: ``sft`` rows (messages, ShareGPT, Alpaca, prompt/completion, text), the system
  prompt and chat template, and their loss masks;
* :mod:`.tasks`: per-task encoding, loss and metrics;
* :mod:`.plan`: the plan shown before training (split, peak group, estimated memory);
* :mod:`.samples`: ``sft``'s held-out prompts answered before and after training;
* :mod:`.generation`: exact match and ROUGE-L of those answers;
* :mod:`.callbacks`: progress bar, per-step log, Ctrl-C handling;
* :mod:`.report`: ``report.json``, ``report.md`` and plots of a finished run;
* :mod:`.train`: :class:`~.train.Recipe`, the run itself.

Nothing is imported here, so that reading the configuration does not load ``transformers``.
"""
