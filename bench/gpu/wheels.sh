# Sourced by the bench/gpu scripts on a GPU machine: the carried wheels (.whl/, from
# ../shared/gpu/fetch-wheels.sh) into /tmp/site, once per visit (a script that calls another
# installs once), and the environment every script wants.
if [ -z "${PDCLUSTER_WHEELS_READY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit
  export PDCLUSTER_WHEELS_READY=1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PDCLUSTER_CACHE=${PDCLUSTER_CACHE:-/tmp/pdcluster-cache}
