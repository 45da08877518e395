"""The toy world: a procedural 64x64 video world small enough that the whole system learns on a laptop.

  palette.py, world.py      colours, shapes, the hidden attribute (size), physics and renderer
  language.py, scripts.py   the prompt grammar and parser; training pairs, six-prompt interactive
                            scripts, leave-and-return benchmark scripts; prompt_files.py writes prompts/
  judge.py                  a procedural detector and the scores built on it (adherence, consistency,
                            hidden attribute on return)
  train.py                  `python -m toyworld.train all` (`make toyworld`): VAE, text encoder, teacher,
                            bidirectional and causal student bases -> weights/
  evaluate.py               `python -m toyworld.evaluate`: the judge's numbers for those models -> weights/metrics.json
"""
