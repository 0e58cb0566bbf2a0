//! The soak's echo server: its own process (the soak re-executes itself inside the server
//! pod's namespace), so ten thousand held connections cost it, not the driver, descriptors;
//! tokio, so they cost no thread each.

use tokio::io::AsyncWriteExt;

pub fn serve(port: u16) -> anyhow::Result<()> {
    ztunnel_tests::procstat::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("::", port)).await?;
        loop {
            let mut conn = match listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    eprintln!("echo server: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}
