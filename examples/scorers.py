"""A user scorer for the quickstart: `eval.sets[].metrics: [scorers:answer_only]`.

A scorer is any function (prediction, reference) -> float (or bool); tunepipe imports it from the
config's folder and reports the mean over the set under the function's name.
"""


def answer_only(prediction: str, reference: str) -> float:
    """1.0 when the reply has no more words than the reference: the system prompt asks for the answer only."""
    return float(len(prediction.split()) <= len(reference.split()))
