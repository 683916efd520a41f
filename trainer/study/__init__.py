"""``medsass-train study``: does pretraining on free pseudo-masks pay off on *my* data, and by how much?

A study pretrains and fine-tunes a grid of paired runs on one or more stores and reports test IoU per arm and
label budget, with paired bootstrap intervals, a convergence check and cross-site scores. Modules, in the order
the study uses them:

* :mod:`.spec`     the study file (typed; YAML + ``--set``)
* :mod:`.stores`   one store per dataset and threshold method (and per other site), built once
* :mod:`.jobs`     the grid of pretrain / ssl / finetune jobs, their keys and run order
* :mod:`.ssl`      the SimCLR baseline (lightly)
* :mod:`.execute`  running jobs through the trainer, recording each in the ledger
* :mod:`.ledger`   ``results.jsonl``: one line per finished run (the study's resumable state)
* :mod:`.stats`    paired bootstrap intervals over test images and seeds
* :mod:`.report`   CSV, markdown tables and plots from the ledger
* :mod:`.runner`   all of the above for one study file
"""
