"""The package as its users get it: built with `python -m build`, uploaded with
twine to a private index (pypiserver with upload authentication, on a free
loopback port), installed with pip from that index alone into a fresh
virtualenv, then `probe demo` and the README's provider/consumer example run
from that install.

The index holds probe's runtime dependencies as wheels too, the way a Nexus
group repository serves a proxy of PyPI beside the hosted repository: pip
reaches nothing but 127.0.0.1. Building those wheels needs PyPI (through pip's
cache after the first run).
"""

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile

import pytest

from conftest import ROOT, wait_for

UPLOADER = "uploader"
UPLOAD_PASSWORD = "s3cret-upload"
TIMEOUT = 600


def _version():
    text = open(os.path.join(ROOT, "probe", "__init__.py"), encoding="utf-8").read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _clean_env(**extra):
    """An environment with no pip, twine or probe settings of the user's, and no
    way to import the source tree instead of the installed package."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PIP_", "TWINE_", "PROBE_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1", TWINE_NON_INTERACTIVE="1")
    env.update(extra)
    return env


def _run(argv, **kwargs):
    kwargs.setdefault("env", _clean_env())
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    return done


def _check(argv, **kwargs):
    done = _run(argv, **kwargs)
    assert done.returncode == 0, "%s failed (exit %d):\n%s\n%s" % (
        " ".join(argv), done.returncode, done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_idl_demo_thrift_is_the_packaged_file():
    """idl/demo.thrift is a relative symlink to the one file the package ships for
    `probe demo`, so the two cannot drift apart."""
    link = os.path.join(ROOT, "idl", "demo.thrift")
    shipped = os.path.join(ROOT, "probe", "demo", "demo.thrift")
    assert os.path.islink(link), "idl/demo.thrift should be a symlink to ../probe/demo/demo.thrift"
    assert not os.path.isabs(os.readlink(link)), os.readlink(link)
    assert os.path.realpath(link) == os.path.realpath(shipped), os.readlink(link)
    assert os.path.isfile(shipped) and not os.path.islink(shipped)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """sdist and wheel from `python -m build` (the wheel is built from the sdist,
    so a file missing from the sdist fails here)."""
    out = tmp_path_factory.mktemp("dist")
    # A copy of the tree: the build writes egg-info and build/ beside its sources.
    source = tmp_path_factory.mktemp("src") / "thriftprobe"
    shutil.copytree(ROOT, str(source), ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".demo-stack",
        "site"))
    _check([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
            str(source)], env=_clean_env(PATH=os.environ["PATH"]))
    version = _version()
    wheel = out / ("thriftprobe-%s-py3-none-any.whl" % version)
    sdist = out / ("thriftprobe-%s.tar.gz" % version)
    assert wheel.is_file() and sdist.is_file(), sorted(os.listdir(str(out)))
    return {"wheel": str(wheel), "sdist": str(sdist), "version": version}


def test_wheel_carries_everything_probe_stack_and_demo_need(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    for needed in ("probe/config/config.yml", "probe/config/schema.sql",
                   "probe/demo/demo.thrift", "probe/demo/__init__.py",
                   "probe/dev/stack.py", "probe/cli.py"):
        assert needed in names, "%s is missing from %s" % (needed, dists["wheel"])
    if os.path.exists(os.path.join(ROOT, "probe", "py.typed")):
        assert "probe/py.typed" in names
    entry_points = [name for name in names if name.endswith("entry_points.txt")]
    assert entry_points, "the wheel declares no console script"


@pytest.fixture(scope="module")
def index(tmp_path_factory, dists):
    """A pypiserver on a free loopback port; uploads need a password, reads do not.
    Yields its URL and package folder; stopped at the end whatever happens."""
    from passlib.apache import HtpasswdFile
    from probe.dev.stack import free_port

    home = tmp_path_factory.mktemp("index")
    packages = home / "packages"
    packages.mkdir()
    htpasswd = HtpasswdFile(str(home / "htpasswd"), new=True)
    htpasswd.set_password(UPLOADER, UPLOAD_PASSWORD)
    htpasswd.save()
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    log = open(str(home / "pypiserver.log"), "w")
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "pypi-server"), "run",
         "--host", "127.0.0.1", "--port", str(port), "--authenticate", "update",
         "--passwords", str(home / "htpasswd"), "--disable-fallback",
         "--server", "wsgiref", str(packages)],
        stdout=log, stderr=subprocess.STDOUT, env=_clean_env(PATH=os.environ["PATH"]))

    def answers():
        assert server.poll() is None, "pypiserver exited: %s" % open(log.name).read()[-2000:]
        try:
            return urllib.request.urlopen(url + "/simple/", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, timeout=30, interval=0.2, message="pypiserver on %s" % url)
        yield {"url": url, "packages": str(packages), "home": str(home)}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _twine_upload(index, password, files):
    return _run([sys.executable, "-m", "twine", "upload", "--repository-url",
                 index["url"] + "/", "--username", UPLOADER, "--password", password,
                 "--config-file", os.path.join(index["home"], "no-pypirc"),
                 "--disable-progress-bar"] + files,
                env=_clean_env(PATH=os.environ["PATH"]))


@pytest.fixture(scope="module")
def filled_index(index, dists):
    """The index after a refused and an accepted upload, with the dependencies'
    wheels beside probe (the proxy half of a Nexus group repository)."""
    refused = _twine_upload(index, "not-the-password", [dists["wheel"]])
    assert refused.returncode != 0, "an upload with a wrong password was accepted"
    assert re.search(r"40[13]", refused.stdout + refused.stderr), refused.stdout + refused.stderr
    assert os.listdir(index["packages"]) == [], "a refused upload left files behind"

    done = _twine_upload(index, UPLOAD_PASSWORD, [dists["sdist"], dists["wheel"]])
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(index["packages"])) == sorted(
        os.path.basename(path) for path in (dists["sdist"], dists["wheel"]))

    # Wheels of every runtime dependency (built from sdists where PyPI has no
    # wheel, so the install below never needs a build backend from the index).
    staging = os.path.join(index["home"], "deps")
    _check([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", staging,
            dists["wheel"]], env=_clean_env(PATH=os.environ["PATH"]))
    for name in os.listdir(staging):
        if not name.startswith("thriftprobe-"):
            shutil.copy(os.path.join(staging, name), index["packages"])
    return index


@pytest.fixture(scope="module")
def installed(filled_index, dists, tmp_path_factory):
    """A fresh virtualenv with `pip install --index-url <private>/simple/
    thriftprobe==<version>` and no other index."""
    venv = str(tmp_path_factory.mktemp("venv") / "env")
    _check([sys.executable, "-m", "venv", venv])
    pip = os.path.join(venv, "bin", "pip")
    done = _check([pip, "install", "--index-url", filled_index["url"] + "/simple/",
                   "thriftprobe==%s" % dists["version"]])
    output = done.stdout + done.stderr
    assert "Successfully installed" in output and "thriftprobe-%s" % dists["version"] in output
    assert "pypi.org" not in output and "pythonhosted" not in output, output
    return venv


def test_wrong_password_upload_is_refused_and_the_right_one_accepted(filled_index, dists):
    listing = urllib.request.urlopen(filled_index["url"] + "/simple/thriftprobe/",
                                     timeout=5).read().decode()
    assert os.path.basename(dists["wheel"]) in listing
    assert os.path.basename(dists["sdist"]) in listing


def test_installed_package_is_the_one_from_the_index(installed, dists):
    python = os.path.join(installed, "bin", "python")
    done = _check([python, "-c", "import probe, probe.demo; print(probe.__version__); "
                   "print(probe.__file__); print(probe.demo.DEMO_IDL)"], cwd=installed)
    version, module, idl = done.stdout.split()
    assert version == dists["version"]
    assert module.startswith(installed) and idl.startswith(installed)
    assert os.path.isfile(idl)


def test_probe_demo_runs_from_the_install_in_an_empty_directory(installed, tmp_path):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    done = _run([os.path.join(installed, "bin", "probe"), "demo"], cwd=str(workdir))
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines().count("hello world") == 1, done.stdout
    assert os.listdir(str(workdir)) == [], "probe demo wrote into the current directory"
    # Torn down: the folder it named is gone, so are its servers' ports.
    state = re.search(r"in (\S+/stack)$", done.stdout, re.M).group(1)
    assert not os.path.exists(os.path.dirname(state))
    ports = re.findall(r"127\.0\.0\.1:(\d+)", done.stdout)
    assert ports
    from probe.dev.stack import _port_in_use
    assert not any(_port_in_use(int(port)) for port in ports)


def _readme_block(title):
    """The python code block under the README line `# <title>` (e.g. provider.py)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    found = re.search(r"```python\n# %s\n(.*?)```" % re.escape(title), text, re.S)
    assert found, "README.md has no ```python block starting with '# %s'" % title
    return found.group(1)


def test_readme_provider_and_consumer_run_from_the_install(installed, tmp_path):
    """The README's two snippets, as files, in a folder with the packaged demo IDL,
    against a stack started by the installed probe."""
    from probe.dev.stack import free_port

    python = os.path.join(installed, "bin", "python")
    probe_cli = os.path.join(installed, "bin", "probe")
    work = tmp_path / "app"
    work.mkdir()
    state = str(tmp_path / "stack")
    stack_code = ("import sys; from probe.dev.stack import Stack; "
                  "s = Stack(sys.argv[2], ports='free'); "
                  "s.up() if sys.argv[1] == 'up' else s.down(wipe=True); print(s.config_path)")
    provider = None
    try:
        config = _check([python, "-c", stack_code, "up", state]).stdout.strip()
        env = _clean_env(PROBE_CONFIG=config, PROBE_ENV="dev",
                         PROBE_SNAPSHOT_DIR=str(tmp_path / "snapshots"),
                         # the stack is on loopback: so is the provider's address
                         PROBE_ADVERTISE_HOST="127.0.0.1")
        _check([probe_cli, "appkey", "add", "hello_www"], env=env)
        _check([python, "-c", "import shutil, probe.demo; "
                "shutil.copy(probe.demo.DEMO_IDL, 'demo.thrift')"], cwd=str(work), env=env)

        provider_code = _readme_block("provider.py")
        # The README's provider takes the default port 8081; a test takes a free one.
        assert provider_code.count("Hello())") == 1, provider_code
        port = free_port()
        (work / "provider.py").write_text(
            provider_code.replace("Hello())", "Hello(), port=%d)" % port))
        (work / "consumer.py").write_text(_readme_block("consumer.py"))
        log = open(str(tmp_path / "provider.log"), "w")
        provider = subprocess.Popen([python, "provider.py"], cwd=str(work), env=env,
                                    stdout=log, stderr=subprocess.STDOUT)

        def registered():
            assert provider.poll() is None, open(log.name).read()[-2000:]
            nodes = _run([probe_cli, "nodes", "hello_www", "DemoService", "--json"], env=env)
            return '"live": true' in nodes.stdout and "127.0.0.1:%d" % port in nodes.stdout

        wait_for(registered, timeout=60, interval=0.5, message="the README provider registered")
        done = _check([python, "consumer.py"], cwd=str(work), env=env)
        assert done.stdout.strip() == "hello world", done.stdout + done.stderr
    finally:
        if provider is not None:
            provider.terminate()
            try:
                provider.wait(20)
            except subprocess.TimeoutExpired:
                provider.kill()
                provider.wait()
        _run([python, "-c", stack_code, "down", state])


def test_docker_compose_matches_the_packaged_config():
    """docker-compose.yml runs what the packaged `dev` env expects, on loopback only
    (checked here on every machine; `make compose-check` adds `docker compose
    config` where Docker Compose exists)."""
    import yaml
    from probe.dev.stack import DEV_PORTS
    from probe.settings import PACKAGED_CONFIG

    compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
    config = yaml.safe_load(open(PACKAGED_CONFIG))
    services = compose["services"]
    assert set(services) == {"zookeeper", "redis", "mariadb"}
    published = {}
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host, port, _ = mapping.split(":")
            assert host == "127.0.0.1", "%s publishes %s beyond loopback" % (name, mapping)
            published[name] = int(port)
    assert published == {"zookeeper": config["zkserver"]["dev"]["port"],
                         "redis": config["redis"]["dev"]["port"],
                         "mariadb": config["mysql"]["dev"]["port"]}
    assert published == {"zookeeper": DEV_PORTS["zookeeper"], "redis": DEV_PORTS["redis"],
                         "mariadb": DEV_PORTS["mysql"]}
    mysql = config["mysql"]["dev"]
    environment = services["mariadb"]["environment"]
    assert (environment["MARIADB_DATABASE"], environment["MARIADB_USER"],
            environment["MARIADB_PASSWORD"]) == (mysql["database"], mysql["username"],
                                                 mysql["password"])
    for volume in services["mariadb"].get("volumes", []):
        source = volume.split(":")[0]
        assert os.path.exists(os.path.join(ROOT, source)), "%s mounts a missing %s" % (
            "mariadb", source)


def test_readme_links_resolve():
    """The README is the door: every relative link in it leads to a file."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text)
               if "://" not in link and not link.startswith("#")}
    assert "docs/index.md" in targets
    missing = sorted(t for t in targets if not os.path.exists(os.path.join(ROOT, t)))
    assert not missing, "README.md links to missing files: %s" % missing
