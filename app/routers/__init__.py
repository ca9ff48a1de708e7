"""One router per endpoint group: health (+ metrics), models, predict."""
