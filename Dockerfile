# labelgw: reverse proxy for containers, routes from Docker labels.
#
#   docker build -t labelgw .
#   docker run -d --name labelgw -p 8080:8080 \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       --group-add "$(stat -c %g /var/run/docker.sock)" labelgw
#
# Backends that listen on the host's loopback need `--network host` instead of -p (see
# compose-examples/basic/gateway.yml). Extra options go after the image name, replacing CMD:
#   docker run ... labelgw twistd -n --pidfile= labelgw --http tcp:8080 --env staging
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A plain (non-editable) install from a copy of the sources, which are then dropped.
# A C compiler only while pip builds: setup.py compiles labelgw/http/linekind.py with mypyc (the slim image has
# Python's headers, not gcc), and the image keeps the compiled module, not the compiler.
# `twistd --help` lists the plugins and so writes twisted/plugins/dropin.cache now, while
# site-packages is writable: the unprivileged user could not, and would rescan at every start.
COPY . /tmp/labelgw-src
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install /tmp/labelgw-src \
    && python -c "import labelgw.http.linekind as m; assert not m.__file__.endswith('.py'), m.__file__" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /tmp/labelgw-src \
    && twistd --help | grep '^ *labelgw ' \
    && useradd --system --create-home --home-dir /home/labelgw --shell /usr/sbin/nologin labelgw

USER labelgw
WORKDIR /home/labelgw
# The local CA and minted certificates live here: keep them across container restarts.
RUN mkdir -p /home/labelgw/.local/share/labelgw
VOLUME /home/labelgw/.local/share/labelgw
EXPOSE 8080 8443
# Healthy while labelgw serves; unhealthy once it drains on SIGTERM (503) or stops answering. The admin listener
# must be on (the default --admin tcp:8081:interface=127.0.0.1); with another --admin, set LABELGW_HEALTHZ too.
ENV LABELGW_HEALTHZ=http://127.0.0.1:8081/healthz
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['LABELGW_HEALTHZ'], timeout=3)"]
# twistd shuts down cleanly on SIGTERM: listeners close, in-flight requests finish.
STOPSIGNAL SIGTERM
CMD ["twistd", "-n", "--pidfile=", "labelgw"]
