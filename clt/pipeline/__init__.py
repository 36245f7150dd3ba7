"""Stage runners shared by the CLI, the demo and notebooks: config in, result object out.

`train` (extract a store, train on a store or on the live model), `evaluation` (metrics on a store
and on held-out text), `attribution` (graphs and feature cards), `steering` (interventions and
continuations), `demo` (all of it), `loading` (transcoders and models by path or name).
"""

from clt.pipeline.attribution import AttributionResult, run_attribution, run_features
from clt.pipeline.demo import DEMO_PROMPT, DEMO_TRAINING, DemoResult, run_demo
from clt.pipeline.evaluation import EvaluationResult, metric_lines, run_evaluation
from clt.pipeline.loading import load_transcoder, model_for
from clt.pipeline.steering import SteeringResult, run_steering
from clt.pipeline.train import TrainingResult, run_extraction, run_streaming, run_training

__all__ = [
    "DEMO_PROMPT",
    "DEMO_TRAINING",
    "AttributionResult",
    "DemoResult",
    "EvaluationResult",
    "SteeringResult",
    "TrainingResult",
    "load_transcoder",
    "metric_lines",
    "model_for",
    "run_attribution",
    "run_demo",
    "run_evaluation",
    "run_extraction",
    "run_features",
    "run_steering",
    "run_streaming",
    "run_training",
]
