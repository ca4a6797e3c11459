fn main() {
    let obj = include_bytes!(concat!(env!("OUT_DIR"), "/leakmon-probes"));
    println!("{}", obj.len());
}
