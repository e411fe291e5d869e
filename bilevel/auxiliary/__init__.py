"""Auxiliary learning: a primary model trained on losses combined by an auxiliary model that
is itself trained by hypergradients of the main-task loss (AuxiLearn, MAOAL)."""

from .combiners import ConvCombiner, LinearCombiner, NonlinearCombiner
from .learner import AuxiliaryLearner
from .meta_optimizer import MetaOptimizer
from .module_aware import ModuleAwareProblem, ModuleAwareWeights, module_groups

__all__ = [
    "AuxiliaryLearner",
    "ConvCombiner",
    "LinearCombiner",
    "MetaOptimizer",
    "ModuleAwareProblem",
    "ModuleAwareWeights",
    "NonlinearCombiner",
    "module_groups",
]
