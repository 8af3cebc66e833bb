//! The real agent against the real relay on 127.0.0.1: the relay runs in-process from its library, the agent
//! as its library (where a test needs to watch its link state) or as the `ct-agent` binary (where a user's
//! commands are the point). Timings are printed, not asserted tightly: these machines are shared and noisy.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ct_agent::connect::ConnectOptions;
use ct_agent::proxy::ProxyConfig;
use std::sync::Arc;

use crate::support::{direct, pair, TestAgent, TestRelay};
use ct_agent::{LinkStatus, RunOptions};
use ct_protocol::Transport;
use ct_relay::{Relay, RelayConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn an_agent_pairs_connects_over_quic_and_shows_up_at_the_relay() {
    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let relay = TestRelay::on(relay_dir.path(), "127.0.0.1:0").await;
    pair(&relay, agent_dir.path(), "1234").await;
    let mut agent = TestAgent::start(agent_dir.path());
    assert_eq!(
        agent.connected(Duration::from_secs(10)).await,
        Transport::Quic
    );
    let views = relay.core.agents().await.unwrap();
    assert_eq!(views.len(), 1);
    assert!(
        views[0].online && views[0].transport == Some(Transport::Quic),
        "{views:?}"
    );
    assert_eq!(
        (views[0].owner.as_str(), views[0].name.as_str()),
        ("1234", "e2e")
    );
    agent.stop().await.unwrap();
    // The agent said goodbye: the relay sees it gone at once, not after the dead-link timeout.
    let start = Instant::now();
    while relay.core.online().await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "relay still lists the agent online"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn with_udp_blocked_the_agent_is_on_websocket_within_about_a_second() {
    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // A relay serving TCP only, and a socket on its UDP port that swallows every datagram: a firewall that
    // drops UDP, with no ICMP answer to give the agent a quick failure.
    let mut config = RelayConfig::new(relay_dir.path().into(), "127.0.0.1:0".parse().unwrap());
    config.quic = false;
    let relay = TestRelay::start(config).await;
    let black_hole = tokio::net::UdpSocket::bind(relay.addr).await.unwrap();
    let _drain = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while black_hole.recv_from(&mut buf).await.is_ok() {}
    });
    pair(&relay, agent_dir.path(), "1").await;

    let started = Instant::now();
    let mut agent = TestAgent::start(agent_dir.path());
    assert_eq!(
        agent.connected(Duration::from_secs(10)).await,
        Transport::WebSocket
    );
    let took = started.elapsed();
    println!("UDP blocked: WebSocket session after {took:?}");
    assert!(took < Duration::from_secs(5), "fallback took {took:?}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn after_a_relay_restart_agents_come_back_by_themselves() {
    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let relay = TestRelay::on(relay_dir.path(), "127.0.0.1:0").await;
    let addr = relay.addr.to_string();
    pair(&relay, agent_dir.path(), "1").await;
    let mut agent = TestAgent::start(agent_dir.path());
    agent.connected(Duration::from_secs(10)).await;

    relay.stop().await;
    agent.disconnected(Duration::from_secs(5)).await;
    let relay = TestRelay::on(relay_dir.path(), &addr).await;
    let ready = Instant::now();
    let transport = agent.connected(Duration::from_secs(35)).await;
    println!(
        "relay restart: agent back over {transport} {:?} after the relay was ready",
        ready.elapsed()
    );
    assert_eq!(relay.core.online().await, 1);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_link_is_noticed_and_repaired() {
    // The relay vanishes without a goodbye (its runtime is simply dropped, as in a crash or a cut cable).
    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir = relay_dir.path().to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (crash_tx, crash_rx) = std::sync::mpsc::channel::<()>();
    let crashed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let relay = Relay::bind(RelayConfig::new(dir, "127.0.0.1:0".parse().unwrap()))
                .await
                .unwrap();
            let token = relay.core().mint_pairing_token("1").await.unwrap().0;
            ready_tx.send((relay.https_addr().unwrap(), token)).unwrap();
            tokio::spawn(relay.run(CancellationToken::new()));
        });
        let _ = crash_rx.recv();
        // Every socket of the relay goes with its runtime; QUIC sends no close frame, so the agent must notice
        // the silence itself.
        rt.shutdown_background();
    });
    let (addr, token) = ready_rx.recv().unwrap();
    ct_agent::pair_with(agent_dir.path(), &token, None, false, &direct())
        .await
        .unwrap();
    let mut agent = TestAgent::start(agent_dir.path());
    agent.connected(Duration::from_secs(10)).await;
    let cut = Instant::now();
    crash_tx.send(()).unwrap();
    crashed.join().unwrap();
    agent.disconnected(Duration::from_secs(15)).await;
    let noticed = cut.elapsed();
    println!("silent relay: link declared dead after {noticed:?}");
    assert!(
        noticed <= Duration::from_secs(6),
        "QUIC dead link noticed only after {noticed:?}"
    );

    // The admin socket of the crashed relay is stale; a new relay on the same data dir replaces it.
    let relay = TestRelay::on(relay_dir.path(), &addr.to_string()).await;
    agent.connected(Duration::from_secs(35)).await;
    drop(relay);
    agent.stop().await.unwrap();
}

fn agent_cmd(config_dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ct-agent"));
    cmd.arg("--config-dir")
        .arg(config_dir)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY");
    cmd.env("LOG_LEVEL", "warn").kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn the_binary_pairs_runs_reports_status_and_stops_for_good_when_revoked() {
    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let relay = TestRelay::on(relay_dir.path(), "127.0.0.1:0").await;

    let out = agent_cmd(agent_dir.path())
        .args([
            "pair",
            &relay.token("555").await.to_string(),
            "--name",
            "laptop",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pair failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("laptop") && text.contains("555") && text.contains("SHA256:"),
        "{text}"
    );
    let key = agent_dir.path().join("agent.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(agent_dir.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    // Pairing again with a used code fails and names the reason.
    let again = agent_cmd(&agent_dir.path().join("other"))
        .args(["pair", &relay.token("555").await.to_string()])
        .output()
        .await
        .unwrap();
    assert!(again.status.success(), "a fresh token pairs a second agent");

    let mut run = agent_cmd(agent_dir.path())
        .arg("run")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let status = agent_cmd(agent_dir.path())
            .arg("status")
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout).to_string();
        if text.contains("connected") && text.contains("quic") {
            assert!(
                text.contains("555") && text.contains(&relay.addr.to_string()),
                "{text}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "status never showed a connection:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    relay.core.revoke("laptop", "operator").await.unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .expect("agent kept running")
        .unwrap();
    assert_eq!(
        code.code(),
        Some(78),
        "revoked agent exits with 78 so service managers stop restarting it"
    );
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(run.stderr.as_mut().unwrap(), &mut err)
        .await
        .unwrap();
    assert!(
        err.contains("revoked") && err.contains("ct-agent pair --force"),
        "{err}"
    );
}

/// A minimal HTTP CONNECT proxy that resolves one made-up name to the relay and counts tunnels; the agent
/// cannot reach the relay any other way, since nothing else knows that name.
async fn connect_proxy(
    name: &'static str,
    target: SocketAddr,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut request = String::new();
                client.read_line(&mut request).await.unwrap();
                let mut line = String::new();
                while client.read_line(&mut line).await.unwrap() > 2 {
                    line.clear();
                }
                let wanted = format!("CONNECT {name}:{} HTTP/1.1", target.port());
                if request.trim_end() != wanted {
                    let _ = client
                        .get_mut()
                        .write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                        .await;
                    return;
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                client
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(client.get_mut(), &mut upstream).await;
            });
        }
    });
    (addr, tunnels)
}

#[tokio::test]
async fn behind_an_https_proxy_the_agent_pairs_and_connects_over_websocket() {
    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = RelayConfig::new(relay_dir.path().into(), "127.0.0.1:0".parse().unwrap());
    // Learn a free port first, so the advertised name can carry it.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    config.listen = SocketAddr::from(([127, 0, 0, 1], port));
    config.public_addrs = vec![format!("relay.invalid:{port}")];
    let relay = TestRelay::start(config).await;
    let (proxy, tunnels) = connect_proxy("relay.invalid", relay.addr).await;

    let proxy_url = format!("http://{proxy}");
    let opts = ConnectOptions {
        proxy: ProxyConfig::from_lookup(|name| (name == "HTTPS_PROXY").then(|| proxy_url.clone())),
        policy: ct_agent::TransportPolicy::WebSocketOnly,
        ..Default::default()
    };
    ct_agent::pair_with(
        agent_dir.path(),
        &relay.token("8").await,
        None,
        false,
        &opts,
    )
    .await
    .unwrap();
    let mut run = RunOptions::new(agent_dir.path());
    run.connect = opts;
    let (tx, mut status) = watch::channel(LinkStatus::Connecting);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(ct_agent::run(run, shutdown.clone(), tx));
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s, LinkStatus::Connected { .. })),
    )
    .await
    .expect("no connection through the proxy")
    .unwrap();
    assert_eq!(
        tunnels.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "pairing and run each tunnelled once"
    );
    assert_eq!(relay.core.online().await, 1);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
