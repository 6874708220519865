#!/bin/sh
# The images' HEALTHCHECK: the container is healthy while its /metrics endpoint answers. The
# coordinator serves it on 9464; a worker group's rank 0 on its --metrics-listen port.
exec curl -fsS --max-time 5 -o /dev/null "${DDPM_HEALTH_URL:-http://127.0.0.1:9464/metrics}"
