//! The DNS learner without root: an in-memory learned-address table for the kernel, the
//! reporter's probes for counters and f.notices. The proxies are real (loopback sockets, no
//! queries), since they give each agent its index.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::daemon::reporter::Reporter;
use crate::daemon::reporter::tests::{NoticeProbe, reporter};
use crate::dns::proxy::ProxyConfig;
use crate::event::Subject;
use crate::policy::Policy;

const GRACE_NS: u64 = 5_000_000_000;
const NOW: u64 = 1_000_000_000_000;
/// The live bank starts here (a reload moved it).
const BANK: u32 = 1 << 20;

/// The kernel's learned-address map; writes fail while `fail` is set.
#[derive(Default)]
struct FakeKernel {
    learned: HashMap<(u32, IpAddr), Learned>,
    /// The server names written with each address.
    names: HashMap<(u32, IpAddr), Vec<KernelName>>,
    fail: bool,
}

impl LearnedAddresses for FakeKernel {
    fn write_learned(
        &mut self,
        agent: u32,
        addr: IpAddr,
        value: &Learned,
        names: &[KernelName],
    ) -> anyhow::Result<()> {
        if self.fail {
            anyhow::bail!("writing the learned-address map (full at 4096 entries?)");
        }
        self.learned.insert((agent, addr), *value);
        self.names.insert((agent, addr), names.to_vec());
        Ok(())
    }
    fn remove_learned(&mut self, agent: u32, addr: IpAddr) -> anyhow::Result<()> {
        self.learned.remove(&(agent, addr));
        self.names.remove(&(agent, addr));
        Ok(())
    }
}

fn policies(dns: &str) -> PolicySet {
    let text = |agent: &str, mode: &str| {
        format!(
            "agent = \"{agent}\"\nmode = \"{mode}\"\n[network]\nallow = [\"example.com:443\"]\n{dns}"
        )
    };
    PolicySet::new(vec![
        Policy::parse(&text("alerted", "alert"), Path::new("a.toml")).expect("policy"),
        Policy::parse(&text("coder", "enforce"), Path::new("c.toml")).expect("policy"),
    ])
    .expect("set")
}

/// A learner with a proxy per agent of `set` (in set order) and each agent's learned limit.
fn learner(set: &PolicySet) -> DnsLearner {
    let (tx, _) = mpsc::channel(1);
    let mut proxies = Proxies::new(
        Arc::new(ProxyConfig {
            upstream: None,
            timeout: Duration::from_secs(1),
        }),
        tx,
    );
    for p in set.iter() {
        proxies.ensure(p).expect("proxy on loopback");
    }
    let mut learner = DnsLearner::new(proxies, GRACE_NS);
    let limits = set.learned_limits().expect("limits");
    learner
        .learned
        .set_limits((0u32..).zip(limits).collect(), &[]);
    learner
}

/// A learner for the two agents of `policies(dns)`, a reporter with probes, a fake kernel.
struct Fixture {
    set: PolicySet,
    dns: DnsLearner,
    reporter: Reporter,
    notices: NoticeProbe,
    kernel: FakeKernel,
}

impl Fixture {
    fn new(dns: &str) -> Self {
        let set = policies(dns);
        let (reporter, _, notices) = reporter();
        Fixture {
            dns: learner(&set),
            set,
            reporter,
            notices,
            kernel: FakeKernel::default(),
        }
    }

    /// Hands `report` to the learner at `now`; the query it says to report.
    fn report(&mut self, report: QueryReport, now: u64) -> Option<DnsQuery> {
        let live = Live {
            policies: &self.set,
            bank_base: BANK,
        };
        self.dns
            .on_report(report, live, &mut self.kernel, &mut self.reporter, now)
    }

    fn expire(&mut self, now: u64) {
        let live = Live {
            policies: &self.set,
            bank_base: BANK,
        };
        self.dns
            .expire(live, &mut self.kernel, &mut self.reporter, now);
    }
}

type InstallReply = oneshot::Receiver<Result<Installed, InstallError>>;

/// An allowed answer of `agent` (proxy index) for example.com.
fn answered(agent: u32, addrs: &[(&str, u32)]) -> (QueryReport, InstallReply) {
    let (tx, rx) = oneshot::channel();
    let report = QueryReport {
        agent,
        name: "example.com".into(),
        qtype: "A".into(),
        transport: "udp",
        outcome: Outcome::Answered {
            allowed: true,
            reason: "host rule example.com:443".into(),
            rcode: "NoError".into(),
            addrs: addrs
                .iter()
                .map(|(a, ttl)| (a.parse().expect("addr"), *ttl))
                .collect(),
            cnames: vec![],
            ports: vec![common::PortRange { lo: 443, hi: 443 }],
            installed: Some(tx),
        },
    };
    (report, rx)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

const CODER: u32 = 1;

#[tokio::test]
async fn an_allowed_answer_is_installed_until_its_ttl_plus_grace_then_expires() {
    let mut f = Fixture::new("");
    let (report, mut installed) = answered(CODER, &[("93.184.216.34", 60)]);
    let q = f.report(report, NOW).expect("a query to report");
    // In the kernel under coder's index in the live bank, before the proxy may reply.
    let value = f.kernel.learned[&(BANK + 1, ip("93.184.216.34"))];
    assert_eq!(value.expires_ns, NOW + 60_000_000_000 + GRACE_NS);
    assert_eq!(
        installed
            .try_recv()
            .expect("the proxy was answered")
            .expect("installed"),
        Installed::default()
    );
    assert_eq!((q.agent.as_str(), q.verdict), ("coder", Verdict::Allowed));
    assert_eq!(q.enforcement, None);
    assert_eq!(
        q.reason,
        "A query: host rule example.com:443; NoError; learned [93.184.216.34 (ttl 60s)]"
    );
    assert_eq!(f.dns.learned_of("coder").map(|(held, _)| held), Some(1));
    assert_eq!(
        (
            f.reporter.counters.dns_queries,
            f.reporter.counters.dns_learned
        ),
        (1, 1)
    );
    assert!(f.notices.ids().is_empty());

    // Still in force at the TTL (the grace covers a connect right after it), gone after.
    f.expire(NOW + 60_000_000_000);
    assert_eq!(f.kernel.learned.len(), 1);
    f.expire(NOW + 60_000_000_000 + GRACE_NS + 1);
    assert!(f.kernel.learned.is_empty());
    assert_eq!(f.dns.learned_of("coder").map(|(held, _)| held), Some(0));
    assert_eq!(f.reporter.counters.dns_learned, 0);
}

#[tokio::test]
async fn non_public_addresses_are_withheld_and_noticed_once_per_interval() {
    let mut f = Fixture::new("");
    let (report, mut installed) = answered(CODER, &[("10.1.2.3", 60), ("93.184.216.34", 60)]);
    let q = f.report(report, NOW).expect("reported");
    // The public one is learned, the private one taken out of the reply.
    assert_eq!(f.kernel.learned.len(), 1);
    assert_eq!(
        installed.try_recv().expect("answered").expect("installed"),
        Installed {
            strip: vec![ip("10.1.2.3")],
            limit_reached: false
        }
    );
    assert_eq!(
        (q.verdict, q.enforcement),
        (Verdict::Allowed, Some("stripped"))
    );
    assert!(q.reason.contains("not learned (non-public"), "{}", q.reason);
    assert_eq!(f.notices.ids(), vec![message_id::DNS_WITHHELD]);
    assert_eq!(
        f.notices.field(0, "WITHHELD").as_deref(),
        Some("non-public")
    );
    assert_eq!(
        f.notices.field(0, "WITHHELD_ADDRS").as_deref(),
        Some("10.1.2.3")
    );
    assert_eq!(f.dns.withheld_of("coder", Withheld::NonPublic), 1);

    // Only private addresses: nothing left, REFUSED. Counted, but no second notice so soon.
    let (report, _) = answered(CODER, &[("192.168.1.1", 60)]);
    let q = f.report(report, NOW + 1).expect("reported");
    assert_eq!(
        (q.verdict, q.enforcement),
        (Verdict::Denied, Some("refused"))
    );
    assert_eq!(f.notices.ids().len(), 1);
    assert_eq!(f.dns.withheld_of("coder", Withheld::NonPublic), 2);
    assert_eq!(f.reporter.counters.dns_withheld_non_public, 2);
    assert_eq!(
        f.dns.withheld_rows(),
        vec![("coder".to_string(), "non-public", 2)]
    );
}

#[tokio::test]
async fn a_private_answers_entry_lets_the_name_answer_with_private_addresses() {
    let mut f = Fixture::new("[dns]\nprivate_answers = [\"example.com\"]\n");
    let (report, _) = answered(CODER, &[("10.1.2.3", 60)]);
    let q = f.report(report, NOW).expect("reported");
    assert_eq!(q.verdict, Verdict::Allowed);
    assert!(f.kernel.learned.contains_key(&(BANK + 1, ip("10.1.2.3"))));
    assert!(f.notices.ids().is_empty());
}

#[tokio::test]
async fn addresses_over_the_limit_are_withheld_and_answer_servfail_when_none_is_left() {
    let mut f = Fixture::new("[dns]\nmax_learned = 1\n");
    let (report, mut installed) = answered(CODER, &[("93.184.216.34", 60), ("93.184.216.35", 60)]);
    let q = f.report(report, NOW).expect("reported");
    assert_eq!(f.kernel.learned.len(), 1);
    assert_eq!(
        installed.try_recv().expect("answered").expect("installed"),
        Installed {
            strip: vec![ip("93.184.216.35")],
            limit_reached: true
        }
    );
    assert_eq!(q.enforcement, Some("stripped"));
    assert_eq!(f.notices.field(0, "WITHHELD").as_deref(), Some("limit"));
    assert_eq!(f.notices.field(0, "LEARNED_LIMIT").as_deref(), Some("1"));
    assert_eq!(f.reporter.counters.dns_limit_reached, 1);

    let (report, _) = answered(CODER, &[("93.184.216.36", 60)]);
    let q = f.report(report, NOW + 1).expect("reported");
    assert_eq!(
        (q.verdict, q.enforcement),
        (Verdict::Denied, Some("servfail"))
    );
    assert_eq!(f.dns.withheld_of("coder", Withheld::Limit), 2);
}

#[tokio::test]
async fn alert_mode_leaves_withheld_addresses_in_the_reply() {
    let mut f = Fixture::new("");
    let (report, mut installed) = answered(0, &[("10.1.2.3", 60)]);
    let q = f.report(report, NOW).expect("reported");
    assert_eq!(q.agent, "alerted");
    assert_eq!(
        installed.try_recv().expect("answered").expect("installed"),
        Installed {
            strip: vec![],
            limit_reached: false
        }
    );
    assert_eq!((q.verdict, q.enforcement), (Verdict::Alert, None));
    assert!(
        q.reason.ends_with("(alert mode: answered unchanged)"),
        "{}",
        q.reason
    );
}

#[tokio::test]
async fn a_failed_kernel_write_is_servfail_and_not_remembered() {
    let mut f = Fixture::new("");
    f.kernel.fail = true;
    let (report, mut installed) = answered(CODER, &[("93.184.216.34", 60)]);
    let q = f.report(report, NOW).expect("reported");
    let err = installed
        .try_recv()
        .expect("answered")
        .expect_err("not installed");
    assert!(matches!(err, InstallError::Kernel(_)), "{err:?}");
    assert_eq!(q.enforcement, Some("servfail"));
    assert!(
        q.reason
            .contains("not installed: writing the learned-address map"),
        "{}",
        q.reason
    );
    assert_eq!(f.dns.learned_of("coder").map(|(held, _)| held), Some(0));
    assert_eq!(f.reporter.counters.dns_install_failures, 1);
}

#[tokio::test]
async fn an_agent_without_a_policy_in_force_gets_no_install() {
    let mut f = Fixture::new("");
    // A reload removed coder: its proxy stays (indices are stable), its policy is gone.
    f.set = PolicySet::new(vec![f.set.get("alerted").expect("alerted").clone()]).expect("set");
    let (report, _) = answered(CODER, &[("93.184.216.34", 60)]);
    assert!(f.report(report, NOW).is_none());
    assert!(f.kernel.learned.is_empty());
}

fn redirect(pid: u32, server: &str) -> ConnectEvent {
    ConnectEvent {
        subject: Subject {
            pid,
            ..Subject::unknown()
        },
        verdict: Verdict::Allowed,
        addr: ip(server),
        port: 53,
        sock_type: 2,
        granted: false,
        send: true,
        unspecified: false,
        connected_peer: false,
        learned: false,
        dns_refused: false,
        egress_refused: false,
    }
}

#[tokio::test]
async fn a_query_is_attributed_to_the_agents_latest_redirect() {
    let mut f = Fixture::new("");
    let refused = || QueryReport {
        agent: CODER,
        name: "evil.test".into(),
        qtype: "AAAA".into(),
        transport: "tcp",
        outcome: Outcome::Refused {
            reason: "no host rule matches \"evil.test\"".into(),
        },
    };
    // None seen yet: nobody known behind it.
    let q = f.report(refused(), NOW).expect("reported");
    assert!(q.client.is_none());
    f.dns
        .redirected("coder".into(), redirect(100, "10.255.255.53"));
    f.dns
        .redirected("alerted".into(), redirect(300, "10.255.255.54"));
    f.dns.redirected("coder".into(), redirect(200, "1.1.1.1"));
    let q = f.report(refused(), NOW).expect("reported");
    assert_eq!(q.client.as_ref().map(|c| c.subject.pid), Some(200));
    assert_eq!(
        (q.verdict, q.enforcement),
        (Verdict::Denied, Some("refused"))
    );
    let object = q.object();
    let action = q.into_action(Action {
        agent: "coder".into(),
        object,
        ..crate::output::tests::connect_action()
    });
    let crate::action::Object::Dns(query) = &action.object else {
        panic!("not a dns action: {action:?}");
    };
    let dest = query.server.as_ref().expect("the server asked");
    assert_eq!(
        (dest.addr, dest.port, dest.transport),
        (ip("1.1.1.1"), 53, "tcp")
    );
    assert_eq!(query.name.as_deref(), Some("evil.test"));
    assert_eq!(
        action.reason,
        "AAAA query: no host rule matches \"evil.test\""
    );
    assert_eq!(f.reporter.counters.dns_refused, 2);
}

#[tokio::test]
async fn an_address_of_a_name_with_a_server_name_rule_goes_to_the_kernel_with_that_name() {
    let mut f = Fixture::new("[[network.tls]]\nhost = \"example.com\"\nport = 443\n");
    let (report, _installed) = answered(CODER, &[("93.184.216.34", 60)]);
    f.report(report, NOW).expect("a query to report");
    let key = (BANK + 1, ip("93.184.216.34"));
    assert_eq!(f.kernel.learned[&key].kernel_sni, 1, "judged in the kernel");
    assert_eq!(
        f.kernel.names[&key],
        vec![KernelName {
            port: 443,
            name: "example.com".into(),
            expires_ns: NOW + 60_000_000_000 + GRACE_NS,
        }]
    );
    // Without request rules nothing changes: the connect is judged by its address only.
    let mut plain = Fixture::new("");
    let (report, _installed) = answered(CODER, &[("93.184.216.34", 60)]);
    plain.report(report, NOW).expect("a query to report");
    assert_eq!(plain.kernel.learned[&key].kernel_sni, 0);
    assert!(plain.kernel.names[&key].is_empty());
}
