"""The scoring the callbacks share: found on the run's callbacks, never by importing another callback."""

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from detox_lightning.evaluation.monitor import RolloutMonitor
from detox_lightning.evaluation.predict import PredictionWriter
from detox_lightning.evaluation.scoring import Scoring, run_scoring, toxicity_of
from detox_lightning.evaluation.toxicity import ToxicityEvaluation
from detox_lightning.rewards.classifiers import ProfanityCheckReward

EVALUATION = Path(__file__).resolve().parents[1] / "detox_lightning" / "evaluation"
CALLBACK_MODULES = {"monitor", "predict", "toxicity"}


def test_the_evaluation_publishes_its_scoring_and_the_others_find_it():
    judge = ProfanityCheckReward()
    plain, judged = ToxicityEvaluation(text="response", max_new_tokens=7), ToxicityEvaluation(judge=judge)
    assert plain.scoring == Scoring("response", None, 7)
    trainer = SimpleNamespace(callbacks=[RolloutMonitor(), PredictionWriter(), plain, judged])
    assert run_scoring(trainer) == plain.scoring
    assert run_scoring(trainer, with_judge=True).judge is judge
    assert run_scoring(SimpleNamespace(callbacks=[RolloutMonitor(), plain]), with_judge=True) is None
    assert run_scoring(SimpleNamespace(callbacks=[])) is None


def test_toxicity_of_scores_each_pair():
    class Half:
        def pair_toxicity(self, queries, responses, text):
            return np.full(len(responses), 0.5)

    assert toxicity_of(Half(), ["q", "q"], ["a", "b"], "response").tolist() == [0.5, 0.5]


def test_no_callback_module_imports_another():
    for name in sorted(CALLBACK_MODULES):
        tree = ast.parse((EVALUATION / f"{name}.py").read_text())
        imported = {
            alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        others = {f"detox_lightning.evaluation.{other}" for other in CALLBACK_MODULES - {name}}
        assert not {i for i in imported if i and any(i == o or i.startswith(o + ".") for o in others)}, name
