"""The online half of recloop: the recommendation API (retrieval → ranking → re-ranking) with cold
start, champion hot swap, popularity fallback, feedback to the landing zone and Prometheus metrics.

See docs/serving.md.
"""

from recloop.serving.app import create_app, serve
from recloop.serving.config import ServingConfig
from recloop.serving.service import Item, Recommendation, RecommendationService

__all__ = ["Item", "Recommendation", "RecommendationService", "ServingConfig", "create_app", "serve"]
