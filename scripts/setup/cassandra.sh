# Apache Cassandra from Maven Central, the CQL server of the scylladb store's tests.
# The jars of org.apache.cassandra:cassandra-all (runtime scope) are resolved once into a
# cache folder; the tests (tests/backends/cassandra.py) start the node from there. A second
# run finds the folder complete and resolves nothing.
#   QQ_CASSANDRA_VERSION  the cassandra-all release (5.0.x: the first line that runs on Java 17)
#   QQ_CASSANDRA_LIB      where its jars go; the tests read the same variable, or the same default
export QQ_CASSANDRA_VERSION="${QQ_CASSANDRA_VERSION:-5.0.8}"
export QQ_CASSANDRA_LIB="${QQ_CASSANDRA_LIB:-${XDG_CACHE_HOME:-$HOME/.cache}/quorum-quest/cassandra-${QQ_CASSANDRA_VERSION}/lib}"

if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    openjdk-17-jre-headless maven >/dev/null
fi

if [ ! -f "$QQ_CASSANDRA_LIB/.complete" ]; then
  # A subshell, so that its trap and its temporary folder stay its own.
  (
    set -euo pipefail
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>quorum-quest.tests</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>${QQ_CASSANDRA_VERSION}</version>
    </dependency>
  </dependencies>
</project>
EOF
    echo "resolving Apache Cassandra ${QQ_CASSANDRA_VERSION} jars into ${QQ_CASSANDRA_LIB}" >&2
    mvn -B -q -Dstyle.color=never -f "$work/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$work/lib"
    touch "$work/lib/.complete"
    # Move into place whole, so an interrupted run never leaves a half-filled folder behind.
    mkdir -p "$(dirname "$QQ_CASSANDRA_LIB")"
    rm -rf "$QQ_CASSANDRA_LIB"
    mv "$work/lib" "$QQ_CASSANDRA_LIB"
  )
fi
