"""Fine-tuning on compressed CoT data with Ray Train: TokenSkip mode and TL;DR domain re-weighting.

Heavy imports (torch, ray.train, transformers) happen inside the functions, so importing the
package stays cheap for the CLI.
"""

from tokenskip.train.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config"]
