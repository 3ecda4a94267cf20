"""``python -m services.risk`` — run the risk sentinel on the bus."""

from libs.common.service import main_for
from services.risk.service import RiskService

if __name__ == "__main__":
    main_for(RiskService)
