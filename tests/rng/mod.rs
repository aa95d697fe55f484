//! The tests' deterministic random numbers: xorshift64*, seeded, the same sequence on every machine.
#![allow(dead_code)]

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-scale, scale).
    pub fn sym(&mut self, scale: f32) -> f32 {
        (self.uniform() * 2.0 - 1.0) * scale
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(scale)).collect()
    }

    /// `vec` rounded to values that are exact in f16.
    pub fn vec16(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| half::f16::from_f32(self.sym(scale)).to_f32()).collect()
    }

    /// Uniform in 0..n; 0 (drawing nothing) when n is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}
