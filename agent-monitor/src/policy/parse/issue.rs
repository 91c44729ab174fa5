//! What can be wrong with a policy file, each problem with its place and what was expected.

use std::fmt;

use thiserror::Error;

use super::AGENT_NAME_MAX;
use super::location::Location;

/// Everything wrong with one or more policy files, one problem per line when displayed.
#[derive(Debug, Error, PartialEq, Eq)]
pub struct PolicyError {
    issues: Vec<Issue>,
}

impl PolicyError {
    pub fn new(issues: Vec<Issue>) -> PolicyError {
        PolicyError { issues }
    }

    pub fn issues(&self) -> &[Issue] {
        &self.issues
    }

    pub fn into_issues(self) -> Vec<Issue> {
        self.issues
    }
}

impl From<Issue> for PolicyError {
    fn from(issue: Issue) -> PolicyError {
        PolicyError::new(vec![issue])
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// One problem in a policy file.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Issue {
    /// TOML syntax, unknown key, wrong type or missing key, as reported by the TOML parser.
    #[error("{at}: {message}")]
    Toml { at: Location, message: String },
    /// A value of the right type that is not valid.
    #[error("{at}: {field} {value:?}: {reason}")]
    Value {
        at: Location,
        /// `agent`, `mode`, `network.allow[2]`, …
        field: String,
        value: String,
        reason: Reason,
    },
    #[error("agent {agent:?} is defined twice: at {first} and at {second}")]
    DuplicateAgent {
        agent: String,
        first: Location,
        second: Location,
    },
    #[error(
        "{second}: {kind} selector {second_value:?} of agent {second_agent:?} overlaps {kind} selector {first_value:?} of agent {first_agent:?} at {first}: a process would match two agents; expected selectors that no two agents share"
    )]
    SelectorConflict {
        kind: &'static str,
        first_agent: String,
        first_value: String,
        first: Location,
        second_agent: String,
        second_value: String,
        second: Location,
    },
}

/// Why a value was rejected; the text says what was expected.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Reason {
    #[error(
        "agent name is empty; expected 1-{AGENT_NAME_MAX} characters of [a-z0-9_.-], starting with [a-z0-9]"
    )]
    AgentEmpty,
    #[error("agent name is {len} characters; expected at most {AGENT_NAME_MAX}")]
    AgentTooLong { len: usize },
    #[error("agent name must start with [a-z0-9], not {0:?}")]
    AgentBadStart(char),
    #[error("character {0:?} is not allowed in an agent name; expected [a-z0-9_.-]")]
    AgentBadChar(char),
    #[error("expected \"enforce\", \"alert\" or \"ask\"")]
    BadMode,

    #[error("empty entry; expected ADDR[/PREFIX]:PORT")]
    NetEmpty,
    #[error("missing port; expected ADDR[/PREFIX]:PORT where PORT is N, LO-HI or *")]
    MissingPort,
    #[error("expected ':' and a port after ']'")]
    JunkAfterBracket,
    #[error("missing ']' after the IPv6 address")]
    UnclosedBracket,
    #[error("IPv6 addresses must be in brackets, e.g. [::1]:80 or [fd00::/8]:443")]
    UnbracketedIpv6,
    #[error("IPv4 addresses are written without brackets, e.g. 10.0.0.1:80")]
    BracketedIpv4,
    #[error("host names take no prefix length; expected NAME:PORT or *.NAME:PORT")]
    HostName,
    #[error("'*' is only allowed as the first label, as in *.example.com:443 (subdomains only)")]
    MisplacedWildcard,
    #[error("host name is empty")]
    HostEmpty,
    #[error("host name is {len} characters; expected at most 253")]
    HostTooLong { len: usize },
    #[error("host name has an empty label; expected labels separated by single dots")]
    HostEmptyLabel,
    #[error("label {label:?} is longer than 63 characters")]
    HostLabelTooLong { label: String },
    #[error(
        "character {0:?} is not allowed in a host name; expected labels of [a-z0-9_-] separated by '.'"
    )]
    HostBadChar(char),
    #[error("label {label:?} must not start or end with '-'")]
    HostHyphen { label: String },
    #[error("the last label is all digits: neither a host name nor an IPv4 address")]
    HostNumeric,
    #[error("{0:?} is not a valid IPv4 address; expected a.b.c.d")]
    BadIpv4(String),
    #[error("{0:?} is not a valid IPv6 address")]
    BadIpv6(String),
    #[error("prefix length {0:?} is not a number")]
    BadPrefix(String),
    #[error("prefix length {len} is longer than {max} for {family}")]
    PrefixTooLong {
        len: u64,
        max: u8,
        family: &'static str,
    },
    #[error("host bits are set below the prefix; did you mean {network}?")]
    HostBitsSet { network: String },
    #[error("port {0:?} is not valid; expected N (1-65535), LO-HI or *")]
    BadPort(String),
    #[error("port 0 is not allowed; expected 1-65535 (or * for every port)")]
    PortZero,
    #[error("port {0} is out of range; expected 1-65535")]
    PortTooLarge(String),
    #[error("port range {lo}-{hi} is reversed; expected LO <= HI")]
    PortRangeReversed { lo: u16, hi: u16 },

    #[error("path contains a NUL byte")]
    NulByte,
    #[error("path must be absolute (start with /)")]
    NotAbsolute,
    #[error("'*' is only allowed at the end of a path, as a prefix glob")]
    MisplacedGlob,
    #[error("path must be normalised (no //, /./, /../, or trailing /. or /..)")]
    NotNormalised,
    #[error(
        "an exact path names a file and cannot end with '/'; use a trailing '*' for a directory's contents"
    )]
    TrailingSlash,
    #[error("path is {len} bytes; at most {max} fit in the kernel table")]
    PathTooLong { len: usize, max: usize },

    #[error(
        "expected a systemd unit name such as \"coder-agent.service\" (.service, .scope or .slice)"
    )]
    BadUnit,
    #[error(
        "the cgroup root would select every process; expected a cgroup below it, e.g. \"/agents/coder\""
    )]
    CgroupRoot,
    #[error(
        "agent-monitor's own cgroup tree cannot be selected; `agent-monitor run` places processes there"
    )]
    ReservedCgroup,
    #[error(
        "uid 0 is root: it would select the daemon, PID 1 and the operator's shell (in enforce mode every root exec the policy does not allow, `daemon --uninstall` included, would be killed); expected the agent's own dedicated uid"
    )]
    RootUid,
    #[error(
        "{what} would capture the host: it holds {holds}; expected a unit or cgroup that holds only the agent's processes"
    )]
    HostCgroup {
        what: &'static str,
        holds: &'static str,
    },
    #[error("an executable selector names one file; globs are not allowed")]
    GlobInSelector,
    #[error("expected the file's sha256 as 64 hex digits (sha256sum FILE)")]
    BadSha256,

    #[error("expected 1-{max} (addresses learned from DNS the agent may hold at once)", max = crate::policy::dns::LEARNED_BUDGET)]
    LearnedLimit,
    #[error("expected a host name without a port: NAME or *.NAME")]
    PatternWithPort,

    #[error("\"/\" would deny every file; expected a file or directory below it")]
    FileRoot,
    #[error(
        "expected a file or directory without a trailing '/' (a directory covers everything below it)"
    )]
    FileTrailingSlash,
    #[error("'*' must be a whole path component, as in /home/*/.aws (any one name)")]
    FilePartialGlob,
    #[error(
        "globs are not supported for unix sockets: the kernel matches exact names; list each socket"
    )]
    UnixGlob,
    #[error("expected a name after '@' (an abstract socket)")]
    UnixAbstractEmpty,
    #[error(
        "[unix] says nothing; expected `allow = [...]` (only those sockets; `allow = []` refuses every unix socket) or `deny_known_daemons = true`"
    )]
    UnixEmptySection,
    #[error(
        "is on the built-in list `deny_known_daemons = true` refuses; remove one of the two (with `allow`, every socket not listed is refused anyway)"
    )]
    UnixAllowsKnownDaemon,
    #[error("expected an HTTP method such as \"GET\" (letters, digits, -), or \"*\" for any")]
    HttpMethod,
    #[error("expected at least one method (\"*\" for any)")]
    HttpMethodsEmpty,
    #[error("expected at least one path (\"/*\" for every path)")]
    HttpPathsEmpty,
    #[error("{0}")]
    HttpPath(&'static str),
    #[error("request rules name at most {max} ports per agent (one kernel entry holds them)")]
    EgressPorts { max: usize },
}
