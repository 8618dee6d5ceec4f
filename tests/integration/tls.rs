use std::process::Command;
use std::time::Duration;

use zero_cache::devpg::{DevPgOptions, DevPostgres};
use zero_cache::pgconn::UpstreamConfig;

use crate::support::{TestDb, start, wait_equal};

/// A cluster that accepts only TLS connections, with a self-signed certificate for 127.0.0.1.
fn tls_cluster(dir: &std::path::Path) -> (DevPostgres, std::path::PathBuf) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    let crt = certs.join("server.crt");
    let key = certs.join("server.key");
    // A CA, and a server certificate for 127.0.0.1 signed by it.
    let ca_crt = certs.join("ca.crt");
    let ca_key = certs.join("ca.key");
    let csr = certs.join("server.csr");
    let ext = certs.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("ext");
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    openssl(&[
        &os("req"),
        &os("-x509"),
        &os("-new"),
        &os("-nodes"),
        &os("-days"),
        &os("2"),
        &os("-subj"),
        &os("/CN=zero-test-ca"),
        &os("-keyout"),
        ca_key.as_os_str(),
        &os("-out"),
        ca_crt.as_os_str(),
    ]);
    openssl(&[
        &os("req"),
        &os("-new"),
        &os("-nodes"),
        &os("-subj"),
        &os("/CN=127.0.0.1"),
        &os("-keyout"),
        key.as_os_str(),
        &os("-out"),
        csr.as_os_str(),
    ]);
    openssl(&[
        &os("x509"),
        &os("-req"),
        &os("-in"),
        csr.as_os_str(),
        &os("-CA"),
        ca_crt.as_os_str(),
        &os("-CAkey"),
        ca_key.as_os_str(),
        &os("-CAcreateserial"),
        &os("-days"),
        &os("2"),
        &os("-extfile"),
        ext.as_os_str(),
        &os("-out"),
        crt.as_os_str(),
    ]);
    let run = |args: &[&str]| {
        let s = Command::new(args[0])
            .args(&args[1..])
            .status()
            .expect("run");
        assert!(s.success(), "{args:?}");
    };
    let key_s = key.to_string_lossy().into_owned();
    run(&["chmod", "600", &key_s]);
    let root = Command::new("id").arg("-u").output().expect("id");
    if String::from_utf8_lossy(&root.stdout).trim() == "0" {
        run(&["chown", "-R", "postgres:postgres", &certs.to_string_lossy()]);
        run(&[
            "chmod",
            "755",
            &dir.to_string_lossy(),
            &certs.to_string_lossy(),
        ]);
    }
    let pg = DevPostgres::start(
        &dir.join("pg"),
        &DevPgOptions {
            port: None,
            fsync: false,
            remove_on_drop: true,
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), format!("'{}'", crt.display())),
                ("ssl_key_file".into(), format!("'{key_s}'")),
            ],
            hba: Some(
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl replication all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n"
                    .into(),
            ),
        },
    )
    .expect("start TLS cluster");
    (pg, ca_crt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_over_tls_and_honours_sslmode() {
    crate::support::cluster(); // logging
    let dir = tempfile::tempdir().expect("temp dir");
    let (pg, crt) = tls_cluster(dir.path());
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port());

    // Without TLS the server refuses us, and the error says so.
    let plain = UpstreamConfig::parse(&format!("{base}?sslmode=disable")).expect("uri");
    let Err(err) = plain.connect().await else {
        panic!("plain connection must be refused");
    };
    assert!(format!("{err:?}").contains("no encryption"), "{err:?}");

    // verify-full against the web PKI roots fails: the certificate's CA is our own.
    let strict = UpstreamConfig::parse(&format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
        pg.port()
    ))
    .expect("uri");
    assert!(
        strict.connect().await.is_err(),
        "self-signed certificate must not verify"
    );

    // verify-full needs a host name the certificate carries.
    assert!(UpstreamConfig::parse(&format!("{base}?sslmode=verify-full")).is_err());
    let uri = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        crt.display()
    );
    let client = UpstreamConfig::parse(&uri)
        .expect("uri")
        .connect()
        .await
        .expect("verify-full with the right root");
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;",
        )
        .await
        .expect("create");
    let db = TestDb {
        name: "postgres".into(),
        uri: uri.clone(),
        client,
        dir: tempfile::tempdir().expect("temp dir"),
    };
    for mode_uri in [format!("{base}?sslmode=require"), uri.clone()] {
        let mut cfg = db.replicator_config();
        cfg.upstream = UpstreamConfig::parse(&mode_uri).expect("uri");
        let mut r = start(cfg);
        r.ready().await;
        db.exec("UPDATE t SET v = v || '!' WHERE id < 10;").await;
        wait_equal(&db, Duration::from_secs(20)).await;
        let encrypted: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE s.ssl AND a.application_name = 'zero-cache-replication'",
                &[],
            )
            .await
            .expect("pg_stat_ssl")
            .get(0);
        assert_eq!(encrypted, 1, "the replication stream runs over TLS");
        r.stop().await.expect("clean stop");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
