"""Evaluation: IFEval, perplexity, side-by-side preference grading (judge, reward model, people)
and safety violation rates. See docs/evaluation.md."""
