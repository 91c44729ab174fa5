//! The interceptor end to end, in process and without root: a local upstream TLS server signed by
//! a test CA, the interceptor in front of it on a loopback listener (as if the kernel had
//! redirected the agent's connect), and real clients (hyper, curl, python3) trusting the
//! agent-monitor CA and naming the upstream's server name.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_allowed_and_post_denied_on_one_keep_alive_connection() {
    let mut s = setup().await;
    let mut c = h1_client(&s).await;
    let (status, body) = send(&mut c, request("GET", "/repos/acme/x", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.starts_with("GET /repos/acme/x host=api.test"),
        "{body}"
    );
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Allowed);
    assert_eq!(
        (report.method.as_str(), report.path.as_str()),
        ("GET", "/repos/acme/x")
    );
    assert_eq!(report.status, 200);
    assert_eq!(report.bytes_in, body.len() as u64);
    assert!(report.rule.is_some());
    assert_eq!(
        (report.agent.as_str(), report.task.as_deref()),
        (AGENT, Some("t1"))
    );
    assert_eq!((report.host.as_str(), report.sni.as_str()), (NAME, NAME));
    assert_eq!(report.original.ip().to_string(), "127.0.0.1");

    let (status, body) = send(&mut c, request("POST", "/repos/acme/x", NAME, "secret")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("agent-monitor"), "{body}");
    assert!(body.contains(AGENT), "{body}");
    assert!(body.contains("method POST not listed"), "{body}");
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Denied);
    assert_eq!(report.status, 403);
    assert!(report.missing.unwrap().contains("POST"));

    // The same connection still serves allowed requests; lower-case methods are the same method.
    let (status, body) = send(&mut c, request("get", "/user/", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.starts_with("GET /user/ "),
        "upstream sees the judged method: {body}"
    );
    let (status, body) = send(&mut c, request("HEAD", "/user/", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(&mut c, request("GET", "//repos/./acme//y", NAME, "")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with("GET /repos/acme/y "),
        "upstream sees the normalised path: {body}"
    );
}

/// Alert mode: what enforce mode refuses with a 403 reaches the server, and the agent gets the
/// server's answer; each such request is reported as an alert naming what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_mode_forwards_requests_off_the_rules_and_reports_them() {
    let mut s = setup_with(OnMiss::Forward).await;
    let mut c = h1_client(&s).await;
    let (status, body) = send(&mut c, request("POST", "/repos/acme/x", NAME, "secret")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.starts_with("POST /repos/acme/x host=api.test") && body.ends_with("body=6"),
        "the server got the POST and its body: {body}"
    );
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Alert);
    assert_eq!((report.method.as_str(), report.status), ("POST", 200));
    assert_eq!((report.bytes_out, report.bytes_in), (6, body.len() as u64));
    assert!(report.rule.is_none());
    assert!(
        report
            .missing
            .as_deref()
            .unwrap_or("")
            .contains("method POST not listed"),
        "{report:?}"
    );

    // A path off the list (normalised as in enforce mode), then a Host other than the server
    // name: both reach the server as sent, on the same connection.
    let (status, body) = send(&mut c, request("GET", "/other//x/./y", NAME, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("GET /other/x/y host=api.test"), "{body}");
    let report = next_report(&mut s).await;
    assert_eq!(
        (report.verdict, report.path.as_str()),
        (Verdict::Alert, "/other/x/y")
    );
    let (status, body) = send(&mut c, request("GET", "/user", "other.test", "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("GET /user host=other.test"), "{body}");
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Alert);
    assert!(
        report
            .missing
            .as_deref()
            .unwrap_or("")
            .contains("domain fronting"),
        "{report:?}"
    );

    // An allowed request is still just allowed.
    let (status, _) = send(&mut c, request("GET", "/user", NAME, "")).await;
    assert_eq!(status, StatusCode::OK);
    let report = next_report(&mut s).await;
    assert_eq!(report.verdict, Verdict::Allowed);
    assert!(report.rule.is_some() && report.missing.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_list_and_escapes_are_denied() {
    let s = setup().await;
    let mut c = h1_client(&s).await;
    for path in [
        "/repos/other/x",
        "/repos/acme/../other",
        "/repos/acme/%2e%2e/other",
        "/..",
        "/repos/acme/..%2f..%2fx",
    ] {
        let (status, body) = send(&mut c, request("GET", path, NAME, "")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
        assert!(body.contains(AGENT), "{body}");
    }
    // The control: the listed path on the same connection.
    let (status, _) = send(&mut c, request("GET", "/repos/acme/%7e", NAME, "")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_other_than_the_server_name_is_denied() {
    let s = setup().await;
    let mut c = h1_client(&s).await;
    let (status, body) = send(&mut c, request("GET", "/user", "other.test", "")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("domain fronting"), "{body}");
    let (status, _) = send(&mut c, request("GET", "/user", "API.test.", "")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the same name in another case is the same host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_for_another_name_is_refused() {
    let s = setup().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(leaves::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.listen).await.unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("other.test").unwrap(),
            tcp,
        )
        .await;
    assert!(
        handshake.is_err(),
        "no certificate for a name the flow was not admitted for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_judged_one_by_one() {
    let mut s = setup().await;
    let tls = agent_tls(&s, NAME, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, TestBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let uri = |p: &str| format!("https://{NAME}{p}");
    let mut get = sender.clone();
    let mut post = sender.clone();
    let (a, b) = tokio::join!(
        get.send_request(Request::get(uri("/repos/acme/h2")).body(text("")).unwrap()),
        post.send_request(
            Request::post(uri("/repos/acme/h2"))
                .body(text("x"))
                .unwrap()
        ),
    );
    let a = a.unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    let body = a.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("GET /repos/acme/h2 host=api.test"),
        "{body}"
    );
    let b = b.unwrap();
    assert_eq!(b.status(), StatusCode::FORBIDDEN);
    let mut verdicts = vec![
        next_report(&mut s).await.verdict,
        next_report(&mut s).await.verdict,
    ];
    verdicts.sort_by_key(|v| v.as_str());
    assert_eq!(verdicts, vec![Verdict::Allowed, Verdict::Denied]);
    // :authority other than the SNI on the same h2 connection.
    let mut fronted = sender.clone();
    let r = fronted
        .send_request(
            Request::get("https://other.test/user")
                .body(text(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1gib_download_streams_with_flat_memory() {
    const SIZE: u64 = 1 << 30;
    let mut s = setup().await;
    let mut c = h1_client(&s).await;
    let started = std::time::Instant::now();
    let response = c
        .send_request(request("GET", &format!("/big?{SIZE}"), NAME, ""))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let before = rss_kib();
    let (mut got, mut peak) = (0u64, before);
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            got += data.len() as u64;
            if got % (64 << 20) < data.len() as u64 {
                peak = peak.max(rss_kib());
            }
        }
    }
    assert_eq!(got, SIZE);
    let grew = peak.saturating_sub(before);
    assert!(
        grew < 64 * 1024,
        "RSS grew by {grew} KiB while 1 GiB passed through (before {before} KiB)"
    );
    let report = next_report(&mut s).await;
    assert_eq!(report.bytes_in, SIZE);
    eprintln!(
        "1 GiB through the interceptor in {:?}; RSS {before} KiB -> peak {peak} KiB",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_judged_then_passed_through() {
    let mut s = setup().await;
    let mut c = h1_client(&s).await;
    let upgrade = |path: &str| {
        Request::get(path)
            .header("host", NAME)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(text(""))
            .unwrap()
    };
    let denied = c.send_request(upgrade("/chat")).await.unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let _ = denied.into_body().collect().await;
    assert_eq!(next_report(&mut s).await.verdict, Verdict::Denied);
    c.ready().await.unwrap();
    let response = c.send_request(upgrade("/ws")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    io.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = [0u8; 23];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping through the tunnel");
    drop(io);
    let report = next_report(&mut s).await;
    assert_eq!((report.verdict, report.status), (Verdict::Allowed, 101));
    assert_eq!((report.bytes_out, report.bytes_in), (23, 23));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keep_alive_and_http2_are_judged_per_request() {
    let s = setup().await;
    for proto in ["--http1.1", "--http2"] {
        let out = output(
            std::process::Command::new("curl")
                .args(["-sS", proto, "--cacert"])
                .arg(&s.ca_pem)
                .arg("--connect-to")
                .arg(format!("{NAME}:443:127.0.0.1:{}", s.listen.port()))
                .args(["-w", "|%{http_code} %{num_connects} %{http_version}\n"])
                .arg(format!("https://{NAME}/repos/acme/curl"))
                .args(["--next", proto, "--cacert"])
                .arg(&s.ca_pem)
                .arg("--connect-to")
                .arg(format!("{NAME}:443:127.0.0.1:{}", s.listen.port()))
                .args(["-w", "|%{http_code} %{num_connects} %{http_version}\n"])
                .args(["-X", "POST", "-d", "data"])
                .arg(format!("https://{NAME}/repos/acme/curl")),
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "curl {proto}: {stderr}");
        // In order: the GET's body and its first connection, then the 403 on the same one.
        let order = [
            "GET /repos/acme/curl host=api.test",
            "|200 1 ",
            "agent-monitor denied this request for agent coder",
            "method POST not listed",
            "|403 0 ",
        ];
        let mut at = 0;
        for want in order {
            let found = stdout[at..].find(want);
            assert!(
                found.is_some(),
                "curl {proto}: {want:?} after byte {at} in {stdout}"
            );
            at += found.unwrap_or(0) + want.len();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_client_get_allowed_post_denied_on_one_connection() {
    let s = setup().await;
    let script = r#"
import http.client, socket, ssl, sys
ca, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
class Redirected(http.client.HTTPSConnection):
    def connect(self):
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name)
c = Redirected(name, context=ctx)
for method, body in (("GET", None), ("POST", b"x"), ("GET", None)):
    c.request(method, "/repos/acme/py", body=body)
    r = c.getresponse()
    print(method, r.status, r.read().decode().strip())
"#;
    let out = output(
        std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&s.ca_pem)
            .arg(s.listen.port().to_string())
            .arg(NAME),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("GET 200 GET /repos/acme/py"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("POST 403 agent-monitor denied"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("GET 200"),
        "the connection survived the denial: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_allowed_and_push_denied_over_smart_http() {
    let test_ca = TestCa::new();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    // A bare repository with one commit, served by git http-backend on 127.0.0.2.
    assert!(
        git(w, &["init", "-q", "-b", "main", "--bare", "repo.git"], &[])
            .status
            .success()
    );
    assert!(
        git(w, &["init", "-q", "-b", "main", "src"], &[])
            .status
            .success()
    );
    std::fs::write(w.join("src/README"), "hello").unwrap();
    assert!(
        git(&w.join("src"), &["add", "README"], &[])
            .status
            .success()
    );
    assert!(
        git(&w.join("src"), &["commit", "-qm", "one"], &[])
            .status
            .success()
    );
    assert!(
        git(
            &w.join("src"),
            &["push", "-q", "../repo.git", "HEAD:refs/heads/main"],
            &[]
        )
        .status
        .success()
    );
    let root = w.to_path_buf();
    let upstream = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let handler: Handler = Arc::new(move |req| Box::pin(git_backend(root.clone(), req)));
    let original = serve_upstream(upstream, test_ca.server_config(&[NAME]), handler);
    // The interceptor on the same port of 127.0.0.1: the URL's port is the original's, as
    // after the kernel's redirect.
    let listener = TcpListener::bind(("127.0.0.1", original.port()))
        .await
        .unwrap();
    let rules = vec![Rule {
        host: NAME.into(),
        port: 0,
        methods: vec!["GET".into(), "POST".into()],
        paths: vec![
            "/repo.git/info/refs".into(),
            "/repo.git/git-upload-pack".into(),
        ],
        text: "clone and fetch only".into(),
        line: 3,
    }];
    let s = front(&test_ca, original, rules, listener, OnMiss::Refuse);
    let url = format!("https://{NAME}:{}/repo.git", original.port());
    let test_ca_pem = w.join("test-ca.pem");
    std::fs::write(
        &test_ca_pem,
        pem::encode(&pem::Pem::new("CERTIFICATE", test_ca.der.to_vec())),
    )
    .unwrap();
    let via = |addr: &str| format!("http.curloptResolve={NAME}:{}:{addr}", original.port());

    let clone = tokio::task::spawn_blocking({
        let (w, url, ca, via) = (
            w.to_path_buf(),
            url.clone(),
            s.ca_pem.clone(),
            via("127.0.0.1"),
        );
        move || {
            git(
                &w,
                &["-c", &via, "clone", "-q", &url, "clone"],
                &[("GIT_SSL_CAINFO", &ca)],
            )
        }
    })
    .await
    .unwrap();
    assert!(
        clone.status.success(),
        "clone through the interceptor: {}",
        String::from_utf8_lossy(&clone.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(w.join("clone/README")).unwrap(),
        "hello"
    );
    std::fs::write(w.join("clone/README"), "changed").unwrap();
    assert!(
        git(&w.join("clone"), &["commit", "-qam", "two"], &[])
            .status
            .success()
    );

    let push = tokio::task::spawn_blocking({
        let (w, ca, via) = (w.to_path_buf(), s.ca_pem.clone(), via("127.0.0.1"));
        move || {
            git(
                &w.join("clone"),
                &["-c", &via, "push", "-q", "origin", "HEAD:main"],
                &[("GIT_SSL_CAINFO", &ca)],
            )
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&push.stderr);
    assert!(
        !push.status.success(),
        "push through the interceptor must fail"
    );
    assert!(stderr.contains("403"), "{stderr}");

    // The control: the same push straight to the server (its own CA) goes through.
    let direct = tokio::task::spawn_blocking({
        let (w, via) = (w.to_path_buf(), via("127.0.0.2"));
        move || {
            git(
                &w.join("clone"),
                &["-c", &via, "push", "-q", "origin", "HEAD:main"],
                &[("GIT_SSL_CAINFO", &test_ca_pem)],
            )
        }
    })
    .await
    .unwrap();
    assert!(
        direct.status.success(),
        "direct push: {}",
        String::from_utf8_lossy(&direct.stderr)
    );
}

/// A measurement for the lead's bench, not a check (it asserts only that every request
/// succeeded): small-request latency and download throughput, direct to the upstream and
/// through the interceptor, interleaved on one machine. In process, without the kernel's
/// redirect: what it shows is the interceptor's own cost (TLS termination, judging, the second
/// TLS connection). `cargo test --release -p agent-monitor measure_interception -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints latency and throughput, direct and intercepted"]
async fn measure_interception_cost() {
    let s = setup().await;
    let mut direct = h1_over(
        tls_to(s.original, &s.upstream_ca, NAME, &[b"http/1.1"])
            .await
            .unwrap(),
    )
    .await;
    let mut through = h1_client(&s).await;
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _round in 0..20 {
        for (client, times) in [(&mut direct, &mut d), (&mut through, &mut t)] {
            for _ in 0..100 {
                let started = std::time::Instant::now();
                let (status, _) = send(client, request("GET", "/user", NAME, "")).await;
                times.push(started.elapsed());
                assert_eq!(status, StatusCode::OK);
            }
        }
    }
    d.sort();
    t.sort();
    eprintln!(
        "small GET, keep-alive: direct p50 {:?} p99 {:?}; intercepted p50 {:?} p99 {:?}; added p50 {:?}",
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        percentile(&t, 0.5),
        percentile(&t, 0.99),
        percentile(&t, 0.5).saturating_sub(percentile(&d, 0.5))
    );
    const SIZE: u64 = 256 << 20;
    let (mut d, mut t) = (Duration::ZERO, Duration::ZERO);
    for _round in 0..3 {
        for (client, total) in [(&mut direct, &mut d), (&mut through, &mut t)] {
            client.ready().await.unwrap();
            let started = std::time::Instant::now();
            let response = client
                .send_request(request("GET", &format!("/big?{SIZE}"), NAME, ""))
                .await
                .unwrap();
            let mut body = response.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                got += frame.unwrap().data_ref().map_or(0, |b| b.len() as u64);
            }
            assert_eq!(got, SIZE);
            *total += started.elapsed();
        }
    }
    let mib_s = |total: Duration| (3 * SIZE) as f64 / (1 << 20) as f64 / total.as_secs_f64();
    eprintln!(
        "download: direct {:.0} MiB/s, intercepted {:.0} MiB/s ({:.0} %)",
        mib_s(d),
        mib_s(t),
        100.0 * mib_s(t) / mib_s(d)
    );
}

#[tokio::test]
async fn reports_that_find_the_queue_full_are_counted_not_waited_for() {
    let (reports, mut rx) = Reports::channel(1);
    let flow = Flow {
        agent: AGENT.into(),
        task: None,
        original: "127.0.0.1:443".parse().unwrap(),
        sni: NAME.into(),
        rules: Vec::new(),
        on_miss: OnMiss::Refuse,
    };
    let report = || RequestReport::opened(&flow, NAME, "GET", "/", NAME);
    reports.send(report());
    reports.send(report());
    assert_eq!(reports.lost(), 1);
    assert!(rx.recv().await.is_some());
    drop(rx);
    reports.send(report());
    assert_eq!(reports.lost(), 2, "a closed queue counts too");
}
