//! The node's TLS policy and SCRAM channel binding, with real clients:
//! psql (libpq's `sslmode` and `channel_binding`), tokio-postgres over
//! rustls (`hotrepart_proxy::tls`), and a hand-written client for what no
//! well-behaved driver sends (a channel-binding downgrade).
#![allow(clippy::unwrap_used)]

use bytes::{Buf, BufMut, BytesMut};
use hotrepart_proxy::tls::{client_config, MakeRustlsConnect, Verify};
use hotrepart_tests::*;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1
/// (with the subjectAltName and `CA:FALSE` rustls/webpki want of a
/// server certificate): (ca, cert, key) PEM paths.
pub(crate) fn make_ca_and_cert(dir: &Path) -> (String, String, String) {
    let p = |f: &str| dir.join(f).display().to_string();
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ],
        &["x509", "-req", "-days", "2", "-CAcreateserial"],
    ];
    let (ca, ca_key, csr, cert, key, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("cert.csr"),
        p("cert.pem"),
        p("key.pem"),
        p("ext.cnf"),
    );
    let extra: [Vec<&str>; 3] = [
        vec![
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-subj",
            "/CN=hotrepart test CA",
        ],
        vec!["-keyout", &key, "-out", &csr],
        vec![
            "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-out", &cert, "-extfile", &ext,
        ],
    ];
    for (args, more) in steps.iter().zip(extra) {
        let out = std::process::Command::new("openssl")
            .args(*args)
            .args(more)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run the openssl CLI ({e}); install it (deploy/setup.sh does)")
            });
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (ca, cert, key)
}

/// A node with `[tls]`; `top` goes before it (top-level keys).
async fn tls_cluster(cert: &str, key: &str, top: &str) -> Cluster {
    Cluster::start(Opts {
        extra: format!(
            "pool_size = 4\nadmin_users = [\"{USER}\"]\n{top}[tls]\ncert = {cert:?}\nkey = {key:?}\n"
        ),
        ..Opts::default()
    })
    .await
}

fn conninfo(c: &Cluster, user: &str, dbname: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} dbname={dbname} {extra}",
        c.addr.port()
    )
}

/// psql -c 'SELECT 42' with `conninfo` and `PGPASSWORD`.
async fn psql42(conninfo: &str, password: &str) -> (bool, String, String) {
    run_cmd(
        &pg_tool("psql"),
        &["-X", "-w", "-At", "-c", "SELECT 42", conninfo],
        &[("PGPASSWORD", password)],
    )
    .await
}

/// tokio-postgres over rustls (`verify`, against the roots in `root`).
async fn tp_tls(
    c: &Cluster,
    password: &str,
    extra: &str,
    verify: Verify,
    root: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let dsn = format!(
        "host=localhost port={} user={USER} password={password} dbname=postgres {extra}",
        c.addr.port()
    );
    let tls = MakeRustlsConnect::new(client_config(verify, Some(Path::new(root))).unwrap());
    let (client, conn) = tokio_postgres::connect(&dsn, tls).await?;
    tokio::spawn(conn);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_refuses_plain_text_logins_and_reloads() {
    let certs = TestDir::new("tls-required");
    let (ca, cert, key) = make_ca_and_cert(&certs.0);
    let c = tls_cluster(&cert, &key, "tls_required = true\n").await;
    // psql in plain text: refused with words naming the setting.
    let (ok, out, err) = psql42(&conninfo(&c, USER, "postgres", "sslmode=disable"), PASSWORD).await;
    assert!(!ok, "a plain-text login passed tls_required: {out}");
    assert!(
        err.contains("accepts only TLS connections (tls_required = true)")
            && err.contains("sslmode=require"),
        "{err}"
    );
    // The SQLSTATE: 28000, as PostgreSQL's hostssl-only pg_hba.
    let plain = format!(
        "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres sslmode=disable",
        c.addr.port()
    );
    let Err(e) = tokio_postgres::connect(&plain, tokio_postgres::NoTls).await else {
        panic!("plain-text login passed tls_required");
    };
    assert_eq!(
        e.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{e}"
    );
    // Before any password is asked: an unknown role gets the same.
    let (ok, _, err) = psql42(&conninfo(&c, "nobody", "postgres", "sslmode=disable"), "x").await;
    assert!(!ok && err.contains("tls_required"), "{err}");
    // The admin console too.
    let (ok, _, err) = psql42(
        &conninfo(&c, USER, "hotrepart", "sslmode=disable"),
        PASSWORD,
    )
    .await;
    assert!(!ok && err.contains("tls_required"), "{err}");
    // Over TLS: served (psql, and tokio-postgres with sslmode=require).
    let (ok, out, err) = psql42(&conninfo(&c, USER, "postgres", "sslmode=require"), PASSWORD).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "42");
    let db = tp_tls(&c, PASSWORD, "sslmode=require", Verify::Full, &ca)
        .await
        .expect("TLS login under tls_required");
    let v: i32 = db.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);

    // A reload turns it off: plain text is served again.
    let mut cfg = hotrepart_proxy::Config::clone(&c.node.cfg());
    cfg.tls_required = false;
    let r = hotrepart_proxy::control::reload::apply(&c.node, cfg);
    assert!(
        r.changed
            .contains(&"tls_required: true -> false".to_string()),
        "{r:?}"
    );
    let (ok, out, err) = psql42(&conninfo(&c, USER, "postgres", "sslmode=disable"), PASSWORD).await;
    assert!(ok, "plain text after tls_required was reloaded off: {err}");
    assert_eq!(out.trim(), "42");
    // ... and on again.
    let mut cfg = hotrepart_proxy::Config::clone(&c.node.cfg());
    cfg.tls_required = true;
    hotrepart_proxy::control::reload::apply(&c.node, cfg);
    let (ok, _, err) = psql42(&conninfo(&c, USER, "postgres", "sslmode=disable"), PASSWORD).await;
    assert!(!ok && err.contains("tls_required"), "{err}");
}

/// `hotrepart serve` refuses tls_required without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_tls_required_without_a_certificate() {
    let dir = TestDir::new("tls-required-no-cert");
    let file = dir.0.join("node.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\ntls_required = true\n[[shards]]\nname = \"s0\"\ndsn = \"host=127.0.0.1 port=1 user=postgres\"\n",
    )
    .unwrap();
    let bin = hotrepart_tests::procs::bin("hotrepart");
    let out = tokio::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {err}");
    assert!(
        err.contains("tls_required = true needs a [tls] section with cert and key"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_plus_with_psql_and_tokio_postgres() {
    let certs = TestDir::new("scram-plus");
    let (ca, cert, key) = make_ca_and_cert(&certs.0);
    let c = tls_cluster(&cert, &key, "").await;
    let bind = "sslmode=require channel_binding=require";
    // libpq computes tls-server-end-point itself (OpenSSL): the node's
    // data must match it.
    let (ok, out, err) = psql42(&conninfo(&c, USER, "postgres", bind), PASSWORD).await;
    assert!(ok, "channel_binding=require over TLS failed: {err}");
    assert_eq!(out.trim(), "42");
    // Without TLS libpq itself refuses (the node offers no PLUS there).
    let (ok, _, err) = psql42(
        &conninfo(
            &c,
            USER,
            "postgres",
            "sslmode=disable channel_binding=require",
        ),
        PASSWORD,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("channel binding"), "{err}");
    // A wrong password, and an unknown role, with channel binding.
    for (user, pw) in [(USER, "wrong"), ("nobody", PASSWORD)] {
        let (ok, _, err) = psql42(&conninfo(&c, user, "postgres", bind), pw).await;
        assert!(!ok);
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{err}"
        );
    }
    // channel_binding=disable over TLS: plain SCRAM-SHA-256 ("n").
    let (ok, _, err) = psql42(
        &conninfo(
            &c,
            USER,
            "postgres",
            "sslmode=require channel_binding=disable",
        ),
        PASSWORD,
    )
    .await;
    assert!(ok, "{err}");

    // tokio-postgres over rustls: PLUS, checked and not checked
    // certificate.
    for verify in [Verify::Full, Verify::None] {
        let db = tp_tls(&c, PASSWORD, bind, verify, &ca)
            .await
            .unwrap_or_else(|e| panic!("{verify:?}: {e}"));
        let v: i32 = db.query_one("SELECT 5", &[]).await.unwrap().get(0);
        assert_eq!(v, 5);
    }
    let e = tp_tls(&c, "wrong", bind, Verify::Full, &ca)
        .await
        .expect_err("wrong password refused");
    assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{e}");
}

/// Reads one backend message: (tag, body).
async fn read_msg<S: AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
    let tag = s.read_u8().await.unwrap();
    let len = s.read_i32().await.unwrap();
    let mut body = vec![0u8; usize::try_from(len - 4).unwrap()];
    s.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// Startup as `app`, then the mechanisms of AuthenticationSASL.
async fn sasl_mechanisms<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Vec<String> {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", USER), ("database", "postgres")],
        &mut buf,
    )
    .unwrap();
    s.write_all(&buf).await.unwrap();
    let (tag, body) = read_msg(s).await;
    assert_eq!(tag, b'R');
    let mut b = &body[..];
    assert_eq!(b.get_i32(), 10, "AuthenticationSASL");
    b.split(|&x| x == 0)
        .take_while(|m| !m.is_empty())
        .map(|m| String::from_utf8(m.to_vec()).unwrap())
        .collect()
}

/// Sends SASLInitialResponse; returns the ErrorResponse's (code, message)
/// that must follow.
async fn sasl_refused<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    mech: &str,
    first: &str,
) -> (String, String) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::sasl_initial_response(mech, first.as_bytes(), &mut buf)
        .unwrap();
    s.write_all(&buf).await.unwrap();
    let (tag, body) = read_msg(s).await;
    assert_eq!(tag, b'E', "expected an ErrorResponse");
    let (mut code, mut msg) = (String::new(), String::new());
    for f in body.split(|&x| x == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&f[1..]).to_string();
        match f[0] {
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
    }
    (code, msg)
}

/// What no driver sends: a `y` flag (downgrade) where PLUS was offered,
/// PLUS without TLS, binding data with plain SCRAM-SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_negotiation_is_checked_on_the_wire() {
    use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
    let certs = TestDir::new("scram-plus-raw");
    let (_ca, cert, key) = make_ca_and_cert(&certs.0);
    let c = tls_cluster(&cert, &key, "").await;
    let tls = || async {
        let mut tcp = TcpStream::connect(c.addr).await.unwrap();
        let mut req = BytesMut::new();
        req.put_i32(8);
        req.put_i32(80_877_103);
        tcp.write_all(&req).await.unwrap();
        assert_eq!(tcp.read_u8().await.unwrap(), b'S');
        let mut mk = MakeRustlsConnect::new(client_config(Verify::None, None).unwrap());
        let connect = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(
            &mut mk,
            "localhost",
        )
        .unwrap();
        connect.connect(tcp).await.unwrap()
    };
    // Over TLS: PLUS first, as PostgreSQL.
    let mut s = tls().await;
    assert_eq!(
        sasl_mechanisms(&mut s).await,
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    );
    // `y`: "I could bind, but you cannot" — a downgrade.
    let (code, msg) = sasl_refused(&mut s, "SCRAM-SHA-256", "y,,n=,r=abcdefgh").await;
    assert_eq!(code, "08P01", "{msg}");
    assert!(msg.contains("channel binding negotiation error"), "{msg}");
    // An unsupported binding type.
    let mut s = tls().await;
    sasl_mechanisms(&mut s).await;
    let (code, msg) = sasl_refused(&mut s, "SCRAM-SHA-256-PLUS", "p=tls-unique,,n=,r=abc").await;
    assert_eq!(code, "08P01", "{msg}");
    assert!(
        msg.contains("unsupported SCRAM channel-binding type"),
        "{msg}"
    );

    // In plain text: SCRAM-SHA-256 only; PLUS and `p=` refused.
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    assert_eq!(sasl_mechanisms(&mut s).await, ["SCRAM-SHA-256"]);
    let (code, msg) = sasl_refused(
        &mut s,
        "SCRAM-SHA-256-PLUS",
        "p=tls-server-end-point,,n=,r=abc",
    )
    .await;
    assert_eq!(code, "08P01", "{msg}");
    assert!(
        msg.contains("invalid SASL authentication mechanism"),
        "{msg}"
    );
    let mut s = TcpStream::connect(c.addr).await.unwrap();
    sasl_mechanisms(&mut s).await;
    let (code, msg) =
        sasl_refused(&mut s, "SCRAM-SHA-256", "p=tls-server-end-point,,n=,r=abc").await;
    assert_eq!(code, "08P01", "{msg}");
    assert!(msg.contains("includes channel binding data"), "{msg}");
}

/// `[admin] tls_cert`/`tls_key`: the admin port speaks HTTPS only;
/// proxyctl verifies it against `--cacert` / HOTREPART_CACERT; the token
/// is checked before any body is read, over HTTPS as over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_https_with_proxyctl() {
    const TOKEN: &str = "https-admin-token-0123456789";
    let certs = TestDir::new("admin-https");
    let (ca, cert, key) = make_ca_and_cert(&certs.0);
    let other = TestDir::new("admin-https-other-ca");
    let (other_ca, _, _) = make_ca_and_cert(&other.0);
    let c = Cluster::start(Opts::default()).await;
    let addr = hotrepart_proxy::control::admin::serve_tls(
        c.node.clone(),
        "127.0.0.1:0",
        TOKEN.into(),
        false,
        Some((Path::new(&cert), Path::new(&key))),
    )
    .await
    .unwrap();
    let https = format!("https://localhost:{}", addr.port());
    let ctl = hotrepart_tests::procs::bin("proxyctl")
        .display()
        .to_string();
    let run = |admin: String, cacert: Option<String>| {
        let ctl = ctl.clone();
        async move {
            let mut env = vec![
                ("HOTREPART_ADMIN", admin),
                ("HOTREPART_TOKEN", TOKEN.into()),
            ];
            if let Some(f) = cacert {
                env.push(("HOTREPART_CACERT", f));
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run_cmd(&ctl, &["--json", "status"], &env).await
        }
    };
    // The right CA: served.
    let (ok, out, err) = run(https.clone(), Some(ca.clone())).await;
    assert!(ok, "proxyctl over https: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shards"], 1, "{out}");
    // No CA: proxyctl says what is missing, before any request.
    let (ok, _, err) = run(https.clone(), None).await;
    assert!(!ok);
    assert!(err.contains("--cacert or HOTREPART_CACERT"), "{err}");
    // Another CA: the certificate is not trusted.
    let (ok, _, err) = run(https.clone(), Some(other_ca)).await;
    assert!(!ok);
    assert!(
        err.contains("cannot reach the admin API") && err.to_lowercase().contains("cert"),
        "{err}"
    );
    // Plain HTTP to the HTTPS port: no answer.
    let (ok, _, err) = run(format!("http://127.0.0.1:{}", addr.port()), None).await;
    assert!(!ok, "plain HTTP was answered on the HTTPS admin port");
    assert!(err.contains("cannot reach the admin API"), "{err}");

    // The token before the body, over HTTPS: a wrong token with a
    // malformed or huge body is 401, not 400/413.
    let agent =
        hotrepart_proxy::tls::http_agent(std::time::Duration::from_secs(20), Some(Path::new(&ca)))
            .unwrap();
    let url = format!("{https}/v1/shards");
    let huge = vec![b'x'; 8 << 20];
    for body in [&b"{not json"[..], &huge[..]] {
        let agent = agent.clone();
        let url = url.clone();
        let is_huge = body.len() > 1000;
        let body = body.to_vec();
        let status = tokio::task::spawn_blocking(move || {
            agent
                .post(&url)
                .header("Authorization", "Bearer wrong-token")
                .header("Content-Type", "application/json")
                .send(&body[..])
                .map(|r| r.status().as_u16())
        })
        .await
        .unwrap();
        match status {
            Ok(s) => assert_eq!(s, 401),
            // The node may answer 401 and close before the whole huge
            // body is sent: a write error then, never a 400 or 413.
            Err(e) => assert!(is_huge, "{e}"),
        }
    }
    let agent2 = agent.clone();
    let url2 = format!("{https}/v1/status");
    let status = tokio::task::spawn_blocking(move || {
        agent2
            .get(&url2)
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .map(|r| r.status().as_u16())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status, 200);
}

/// A node config with one shard at `dsn` and the test user.
fn one_shard_config(dsn: &str, extra: &str) -> hotrepart_proxy::Config {
    let text = format!(
        "listen = \"127.0.0.1:0\"\npool_size = 2\n{extra}\n[[shards]]\nname = \"s0\"\ndsn = {dsn:?}\n[[users]]\nname = \"{USER}\"\nauth = \"scram-sha-256\"\npassword_hash = \"{}\"\nserver_user = \"postgres\"\n",
        hotrepart_proxy::frontend::auth::scram_verifier(PASSWORD),
    );
    hotrepart_proxy::Config::from_toml(&text).unwrap()
}

/// Whether the node's backend connection to the shard uses TLS (as the
/// shard sees it), through a client of the node; `Err`: the login failed.
async fn shard_ssl_through_node(dsn: &str, extra: &str) -> Result<bool, tokio_postgres::Error> {
    let c = Cluster::with_config(
        one_shard_config(dsn, extra),
        vec![],
        TestDir::new("shard-tls-node"),
    )
    .await;
    let db = connect(&c.dsn()).await?;
    let row = db
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// A direct backend login as the node makes it: the error's words.
async fn backend_error(dsn: &str, allow_cleartext: bool) -> Option<String> {
    let (plain, tls) = hotrepart_proxy::tls::split_shard_dsn(dsn).unwrap();
    let pc: tokio_postgres::Config = plain.parse().unwrap();
    let t = hotrepart_proxy::backend::conn::BackendTarget {
        shard: "s0".into(),
        addr: Ok(format!("127.0.0.1:{}", pc.get_ports()[0]).parse().unwrap()),
        user: pc.get_user().unwrap().into(),
        password: pc
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        database: "postgres".into(),
        tls: hotrepart_proxy::backend::conn::BackendTls {
            tls,
            host: "127.0.0.1".into(),
            allow_cleartext_password: allow_cleartext,
        },
    };
    hotrepart_proxy::backend::conn::BackendConn::connect(&t, std::time::Duration::from_secs(10))
        .await
        .err()
        .map(|e| e.to_string())
}

/// The node's own connections to a shard follow the DSN's `sslmode` and
/// `sslrootcert`; a cleartext password is sent only over TLS unless
/// `allow_cleartext_shard_password`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_connections_use_tls_as_the_dsn_says() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("shard-tls");
    let (ca, cert, key) = make_ca_and_cert(&dir.0);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let other = TestDir::new("shard-tls-other-ca");
    let (other_ca, _, _) = make_ca_and_cert(&other.0);
    let d = dir.0.join("s0");
    let d2 = d.clone();
    let mut pg = tokio::task::spawn_blocking(move || start_pg(&d2))
        .await
        .unwrap();
    // The shard asks for a cleartext password (pg_hba `password`), and
    // speaks TLS.
    // The server may run as another user (tests as root): its key must
    // be its own (PostgreSQL refuses a key others can read).
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(d.join("data")).unwrap();
        for f in [&cert, &key] {
            std::os::unix::fs::chown(f, Some(m.uid()), Some(m.gid())).unwrap();
        }
    }
    let hba = d.join("data").join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, text.replace("scram-sha-256", "password")).unwrap();
    pg.restart_with(&format!(
        "-c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"
    ))
    .unwrap();
    let base = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=postgres",
        pg.port, pg.superuser, pg.password
    );

    // verify-full against the CA that signed the shard's certificate.
    let full = format!("{base} sslmode=verify-full sslrootcert={ca}");
    assert!(shard_ssl_through_node(&full, "").await.unwrap());
    // require (no check) and verify-ca.
    for mode in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-ca sslrootcert={ca}"),
    ] {
        assert!(
            shard_ssl_through_node(&format!("{base} {mode}"), "")
                .await
                .unwrap(),
            "{mode}"
        );
    }
    // Another CA: the node does not log in, the client gets 08006.
    let wrong = format!("{base} sslmode=verify-full sslrootcert={other_ca}");
    let e = shard_ssl_through_node(&wrong, "").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::CONNECTION_FAILURE), "{e}");
    let m = backend_error(&wrong, false)
        .await
        .expect("untrusted certificate refused");
    assert!(
        m.contains("TLS with shard s0 failed (sslmode=verify-full)"),
        "{m}"
    );

    // Plain text: the cleartext password is not sent ...
    let e = shard_ssl_through_node(&base, "").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::CONNECTION_FAILURE), "{e}");
    let m = backend_error(&base, false)
        .await
        .expect("cleartext refused");
    assert!(
        m.contains("asks for a cleartext password over a connection without TLS")
            && m.contains("allow_cleartext_shard_password"),
        "{m}"
    );
    // ... unless allowed.
    assert!(
        !shard_ssl_through_node(&base, "allow_cleartext_shard_password = true")
            .await
            .unwrap()
    );

    // The node's tokio-postgres connections (admin API, reshard, jobs)
    // follow the DSN too: adding a shard checks that it can be reached.
    let c = Cluster::with_config(
        one_shard_config(&full, ""),
        vec![],
        TestDir::new("shard-tls-admin"),
    )
    .await;
    const TOKEN: &str = "shard-tls-admin-token-0123";
    let admin =
        hotrepart_proxy::control::admin::serve(c.node.clone(), "127.0.0.1:0", TOKEN.into(), false)
            .await
            .unwrap();
    let add = |dsn: String| async move {
        tokio::task::spawn_blocking(move || {
            let agent =
                hotrepart_proxy::tls::http_agent(std::time::Duration::from_secs(20), None).unwrap();
            let mut r = agent
                .post(&format!("http://{admin}/v1/shards"))
                .header("Authorization", &format!("Bearer {TOKEN}"))
                .send_json(serde_json::json!({ "name": "s1", "dsn": dsn }))
                .unwrap();
            (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
        })
        .await
        .unwrap()
    };
    let (st, body) = add(wrong.clone()).await;
    assert_eq!(st, 400, "{body}");
    assert!(
        body.contains("cannot connect") && body.contains("TLS handshake"),
        "{body}"
    );
    let (st, body) = add(format!("{full} application_name=x")).await;
    assert_eq!(st, 200, "{body}");
    drop(c);

    // A shard without TLS and sslmode=require: no fallback to plain text.
    pg.restart_with("-c ssl=off").unwrap();
    let m = backend_error(&format!("{base} sslmode=require"), true)
        .await
        .expect("no TLS, no connection");
    assert!(
        m.contains("does not accept TLS connections") && m.contains("sslmode=require"),
        "{m}"
    );
}
