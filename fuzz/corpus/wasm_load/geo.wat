;; geo.wat: region placement for hotrepart (routing-function ABI v1,
;; docs/WASM_ABI.md).
;;
;; The region picks the top 8 bits of the point; the other 56 bits are a hash
;; of the whole key. Region r owns the points [r << 56, (r+1) << 56), so
;; ranges with those bounds map regions to shards (e.g. EU rows on an EU
;; shard), and a region can later be split further by hash.
;;
;;   text key "rr:..." with a known two-letter region code rr:
;;       eu -> 1, us -> 2, ap -> 3, sa -> 4, af -> 5, me -> 6
;;     any other text key (unknown code, no "rr:" prefix) -> region 0
;;   int8 key: the region is the key's top byte (bits 56..63)
;;   any other type -> trap
;;
;;   point = region << 56 | fmix64(fnv1a64(key bytes)) >> 8
;;
;; key bytes: the text's UTF-8 bytes, or the int8's 8 big-endian bytes.
;; fnv1a64: FNV-1a, 64 bits (offset 0xcbf29ce484222325, prime 0x100000001b3).
;; fmix64:  MurmurHash3's 64-bit finaliser.
;;
;; Examples (pinned by udf-wasm/tests/examples.rs):
;;   "eu:berlin-1"  -> 0x01e1eddd_8017cf0a
;;   "us:nyc-7"     -> 0x02323e11_90f97f46
(module
  (memory (export "memory") 1)

  (func (export "hr_abi_version") (result i32) (i32.const 1))

  ;; The key buffer starts at 1024; memory grows when a key needs it.
  (func (export "hr_alloc") (param $len i32) (result i32)
    (local $need i32)
    (local.set $need
      (i32.shr_u (i32.add (local.get $len) (i32.const 66559)) (i32.const 16)))
    (if (i32.gt_u (local.get $need) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $need) (memory.size)))
                    (i32.const -1))
          (then (return (i32.const -1))))))
    (i32.const 1024))

  (func $fnv1a64 (param $p i32) (param $n i32) (result i64)
    (local $h i64) (local $end i32)
    (local.set $h (i64.const 0xcbf29ce484222325))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $h
          (i64.mul (i64.xor (local.get $h) (i64.load8_u (local.get $p)))
                   (i64.const 0x100000001b3)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (local.get $h))

  (func $fmix64 (param $h i64) (result i64)
    (local.set $h (i64.xor (local.get $h) (i64.shr_u (local.get $h) (i64.const 33))))
    (local.set $h (i64.mul (local.get $h) (i64.const 0xff51afd7ed558ccd)))
    (local.set $h (i64.xor (local.get $h) (i64.shr_u (local.get $h) (i64.const 33))))
    (local.set $h (i64.mul (local.get $h) (i64.const 0xc4ceb9fe1a85ec53)))
    (i64.xor (local.get $h) (i64.shr_u (local.get $h) (i64.const 33))))

  ;; Region number of a text key starting at $p, $n bytes long.
  (func $text_region (param $p i32) (param $n i32) (result i32)
    (local $code i32)
    (if (i32.lt_u (local.get $n) (i32.const 3)) (then (return (i32.const 0))))
    (if (i32.ne (i32.load8_u offset=2 (local.get $p)) (i32.const 58))
      (then (return (i32.const 0))))
    (local.set $code
      (i32.or (i32.shl (i32.load8_u (local.get $p)) (i32.const 8))
              (i32.load8_u offset=1 (local.get $p))))
    (if (i32.eq (local.get $code) (i32.const 0x6575)) (then (return (i32.const 1)))) ;; eu
    (if (i32.eq (local.get $code) (i32.const 0x7573)) (then (return (i32.const 2)))) ;; us
    (if (i32.eq (local.get $code) (i32.const 0x6170)) (then (return (i32.const 3)))) ;; ap
    (if (i32.eq (local.get $code) (i32.const 0x7361)) (then (return (i32.const 4)))) ;; sa
    (if (i32.eq (local.get $code) (i32.const 0x6166)) (then (return (i32.const 5)))) ;; af
    (if (i32.eq (local.get $code) (i32.const 0x6d65)) (then (return (i32.const 6)))) ;; me
    (i32.const 0))

  (func (export "hr_route") (param $oid i32) (param $p i32) (param $n i32) (result i64)
    (local $region i32)
    (block $known
      ;; text (OID 25)
      (if (i32.eq (local.get $oid) (i32.const 25))
        (then
          (local.set $region (call $text_region (local.get $p) (local.get $n)))
          (br $known)))
      ;; int8 (OID 20): the top byte of the big-endian value
      (if (i32.and (i32.eq (local.get $oid) (i32.const 20))
                   (i32.eq (local.get $n) (i32.const 8)))
        (then
          (local.set $region (i32.load8_u (local.get $p)))
          (br $known)))
      unreachable)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $region)) (i64.const 56))
      (i64.shr_u (call $fmix64 (call $fnv1a64 (local.get $p) (local.get $n)))
                 (i64.const 8))))
)
