"""The Java side of the Flink runner, fetched once from Maven Central into a cache.

``fetch`` resolves the modules of ``launcher/java/pom.xml`` (Beam's Flink job
server and the GCP IO expansion service, Beam Java :data:`BEAM_JAVA_VERSION`;
the pom says why not Beam's uber jars) with ``mvn dependency:copy-dependencies``
into ``<cache>/jars/beam-<version>-flink-<flink>/lib`` and writes two thin
launcher jars next to it whose manifests put ``lib/*`` on the class path:

- the job server (``java -jar`` it, or give it to ``--flink_job_server_jar``),
  with the Java SDK harness and the GCP IOs inside, so that a cross-language
  Pub/Sub read runs EMBEDDED in the Flink JVM without Docker;
- the expansion service for the GCP IOs, bound to one address
  (``java/LoopbackExpansionService.java``; Beam's own main listens on all
  interfaces).

The Python SDK (2.77) talks to them over Beam's portability API, which is
versioned; the tests run that pair. The cache is ``$BERTSTREAM_CACHE`` or
``~/.cache/bertstream``.
"""

import hashlib
import io
import logging
import re
import shutil
import subprocess
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from bertstream.config import cache_dir

_LOG = logging.getLogger(__name__)

JAVA_DIR = Path(__file__).resolve().parent / "java"
POM = JAVA_DIR / "pom.xml"
BEAM_JAVA_VERSION = re.search(r"<beam.version>([^<]+)</beam.version>", POM.read_text()).group(1)
FLINK_VERSIONS = ("1.19",)
DEFAULT_FLINK_VERSION = "1.19"
# Beam's FlinkJobServerDriver with one flag of ours (java/BertstreamFlinkJobServer.java).
JOB_SERVER_MAIN = "BertstreamFlinkJobServer"
EXPANSION_MAIN = "LoopbackExpansionService"
_JAVA_SOURCES = (JAVA_DIR / f"{JOB_SERVER_MAIN}.java", JAVA_DIR / f"{EXPANSION_MAIN}.java")
MAVEN_HINT = "mvn and a JDK (javac) are needed: sudo apt-get install -y maven openjdk-17-jdk-headless"
# The Flink Kubernetes Operator's FlinkDeployment CRD, which the manifest tests
# validate k8s/ against. It ships in the operator's API jar on Maven Central;
# 1.10.0 is the newest served there from here (k8s/README.md installs 1.15.0).
FLINK_OPERATOR_API_VERSION = "1.10.0"
_OPERATOR_API_JAR = ("https://repo1.maven.org/maven2/org/apache/flink/"
                     "flink-kubernetes-operator-api/{v}/flink-kubernetes-operator-api-{v}.jar")
_OPERATOR_API_SHA256 = {
    "1.10.0": "b1f44814e17514fa8395c61b329a3ee9087123a5bda5b21fe1a495d5182c30b6"}
_CRD_NAME = "flinkdeployments.flink.apache.org-v1.yml"


def jars_dir(flink_version: str = DEFAULT_FLINK_VERSION) -> Path:
    return cache_dir() / "jars" / f"beam-{BEAM_JAVA_VERSION}-flink-{flink_version}"


def job_server_jar(flink_version: str = DEFAULT_FLINK_VERSION) -> Path:
    return jars_dir(flink_version) / (
        f"beam-runners-flink-{flink_version}-job-server-{BEAM_JAVA_VERSION}.jar")


def expansion_service_jar(flink_version: str = DEFAULT_FLINK_VERSION) -> Path:
    return jars_dir(flink_version) / (
        f"beam-sdks-java-io-google-cloud-platform-expansion-service-{BEAM_JAVA_VERSION}.jar")


def _ready_text(flink_version: str) -> str:
    return f"beam-java {BEAM_JAVA_VERSION} flink {flink_version}\n{POM.read_text()}"


def _launchers_text() -> str:
    return "".join(p.read_text() for p in _JAVA_SOURCES)


def _is_current(marker: Path, text: str) -> bool:
    return marker.exists() and marker.read_text() == text


def is_fetched(flink_version: str = DEFAULT_FLINK_VERSION) -> bool:
    """Whether the cache holds the jars of today's pom.xml, and launcher jars
    built from today's Java sources."""
    target = jars_dir(flink_version)
    return (_is_current(target / "READY", _ready_text(flink_version))
            and _is_current(target / "LAUNCHERS", _launchers_text()))


def lib_dir(flink_version: str = DEFAULT_FLINK_VERSION) -> Path:
    """The class path of the job server, the expansion service and the local
    Flink cluster (``launcher/flink_cluster.py``)."""
    return jars_dir(flink_version) / "lib"


def require(flink_version: str = DEFAULT_FLINK_VERSION) -> tuple[Path, Path]:
    """``(job server jar, expansion service jar)``; FileNotFoundError says how to fetch."""
    if flink_version not in FLINK_VERSIONS:
        raise ValueError(f"--flink_version {flink_version}: only {', '.join(FLINK_VERSIONS)} "
                         f"is fetched (Beam Java {BEAM_JAVA_VERSION} from Maven Central)")
    if not is_fetched(flink_version):
        raise FileNotFoundError(
            f"the Beam Flink job server is not in {jars_dir(flink_version)}: run "
            f"`python -m launcher fetch-jars` (or `make jars`; needs Maven and Maven "
            f"Central) first")
    return job_server_jar(flink_version), expansion_service_jar(flink_version)


def _manifest_line(text: str) -> bytes:
    """One manifest header, folded at 72 bytes as the JAR spec requires."""
    raw = text.encode()
    lines = [raw[:72]]
    raw = raw[72:]
    while raw:
        lines.append(b" " + raw[:71])
        raw = raw[71:]
    return b"\r\n".join(lines) + b"\r\n"


def write_launcher_jar(path: Path, main_class: str, lib: Path,
                       classes: dict[str, bytes] | None = None) -> None:
    """A jar holding only a manifest (``Main-Class``, ``Class-Path: lib/...``) and
    optionally a few classes, so ``java -jar path`` runs ``main_class``."""
    jars = sorted(p.name for p in lib.glob("*.jar"))
    class_path = " ".join(f"{lib.name}/{name}" for name in jars)
    manifest = (_manifest_line("Manifest-Version: 1.0") + _manifest_line(f"Main-Class: {main_class}")
                + _manifest_line(f"Class-Path: {class_path}") + b"\r\n")
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", manifest)
        for name, data in (classes or {}).items():
            jar.writestr(name, data)
    tmp.replace(path)


def fetch(flink_version: str = DEFAULT_FLINK_VERSION, force: bool = False) -> Path:
    """Fetches the jars once (Maven), compiles the project's two Java mains and
    writes the launcher jars. Returns the directory; quick when already done
    (a changed Java source recompiles in seconds, without Maven)."""
    if flink_version not in FLINK_VERSIONS:
        raise ValueError(f"--flink_version must be one of {', '.join(FLINK_VERSIONS)}")
    target = jars_dir(flink_version)
    if is_fetched(flink_version) and not force:
        _LOG.info("jars already in %s", target)
        return target
    for tool in ("mvn", "javac", "java"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"`{tool}` is not installed: {MAVEN_HINT}")
    target.mkdir(parents=True, exist_ok=True)
    lib = lib_dir(flink_version)
    if force or not _is_current(target / "READY", _ready_text(flink_version)):
        (target / "READY").unlink(missing_ok=True)
        _LOG.info("resolving Beam Java %s for Flink %s with Maven (about 215 MB, once)",
                  BEAM_JAVA_VERSION, flink_version)
        # Into a new directory first: a failed resolve leaves the old jars in place.
        incoming = target / "lib.incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        subprocess.run(["mvn", "-B", "-q", "-f", str(POM), "dependency:copy-dependencies",
                        f"-Dflink.version={flink_version}", f"-DoutputDirectory={incoming}",
                        "-DincludeScope=runtime"], check=True)
        shutil.rmtree(lib, ignore_errors=True)
        incoming.rename(lib)
        (target / "READY").write_text(_ready_text(flink_version))
    (target / "LAUNCHERS").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="bertstream-javac-") as classes:
        subprocess.run(["javac", "-cp", f"{lib}/*", "-d", classes,
                        *map(str, _JAVA_SOURCES)], check=True)
        compiled = {p.relative_to(classes).as_posix(): p.read_bytes()
                    for p in Path(classes).rglob("*.class")}
    write_launcher_jar(job_server_jar(flink_version), JOB_SERVER_MAIN, lib, compiled)
    write_launcher_jar(expansion_service_jar(flink_version), EXPANSION_MAIN, lib, compiled)
    (target / "LAUNCHERS").write_text(_launchers_text())
    _LOG.info("jars ready in %s", target)
    return target


def crd_path(version: str = FLINK_OPERATOR_API_VERSION) -> Path:
    """Where ``fetch_crd`` puts the FlinkDeployment CRD of operator ``version``."""
    return cache_dir() / "crds" / f"flink-kubernetes-operator-{version}" / _CRD_NAME


def fetch_crd(version: str = FLINK_OPERATOR_API_VERSION, force: bool = False) -> Path:
    """Downloads the operator's API jar once (checked against its pinned sha256)
    and keeps the FlinkDeployment CRD from its ``META-INF/fabric8/``."""
    target = crd_path(version)
    if target.is_file() and not force:
        return target
    url = _OPERATOR_API_JAR.format(v=version)
    _LOG.info("fetching the FlinkDeployment CRD from %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            jar = response.read()
    except OSError as err:
        raise FileNotFoundError(f"could not download {url} ({err}): the manifest tests "
                                "need the Flink operator's CRD from Maven Central") from None
    digest = hashlib.sha256(jar).hexdigest()
    if digest != _OPERATOR_API_SHA256[version]:
        raise ValueError(f"{url}: sha256 {digest}, expected {_OPERATOR_API_SHA256[version]}")
    with zipfile.ZipFile(io.BytesIO(jar)) as archive:
        crd = archive.read(f"META-INF/fabric8/{_CRD_NAME}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(crd)
    tmp.replace(target)
    return target
