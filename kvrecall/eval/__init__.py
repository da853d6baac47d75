"""Long-context task prompts (:mod:`kvrecall.eval.tasks`) and the accuracy harness.

Importing this package loads neither torch nor transformers; the measured full-KV accuracy of
each task format is in ``kvrecall/eval/FORMATS.md``.
"""
