//! The benchmarks' log lines: realistic 100-byte access-log lines with varied fields
//! (they gzip 3-6x, not 30x like padding).

pub fn line(i: u64, width: usize, rnd: &mut impl rand::Rng) -> Vec<u8> {
    let paths = [
        "/",
        "/login",
        "/api/v1/items",
        "/api/v1/orders",
        "/static/app.js",
        "/health",
    ];
    let codes = [200, 200, 200, 304, 404, 500];
    let mut l = format!(
        "10.{}.{}.{} - - \"GET {}?id={} HTTP/1.1\" {} {} req={i}",
        rnd.random_range(0..256),
        rnd.random_range(0..256),
        rnd.random_range(0..256),
        paths[rnd.random_range(0..paths.len())],
        rnd.random_range(0..100_000),
        codes[rnd.random_range(0..codes.len())],
        rnd.random_range(100..50_000),
    )
    .into_bytes();
    l.resize(width, b' ');
    l
}
