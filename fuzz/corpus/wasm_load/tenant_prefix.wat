;; tenant_prefix.wat: tenant placement for hotrepart (routing-function ABI v1,
;; docs/WASM_ABI.md).
;;
;; All keys of one tenant map into one slice of 2^32 points, so a tenant stays
;; on one range (and one shard) as long as range bounds are multiples of 2^32.
;; Tenants are spread evenly over the keyspace by a hash of the tenant id.
;;
;;   text key "tenant:rest"  -> point = fmix32(fnv1a32(tenant)) << 32
;;                                    | fmix32(fnv1a32(rest))
;;                              (no ':' -> the whole key is the tenant and
;;                               rest is empty)
;;   int8 key t<<32 | r      -> point = fmix32(t) << 32 | fmix32(r)
;;                              (t = the high 32 bits, r = the low 32 bits)
;;   any other type          -> trap (the statement fails)
;;
;; fnv1a32: FNV-1a, 32 bits (offset 0x811c9dc5, prime 0x01000193) over bytes.
;; fmix32:  MurmurHash3's 32-bit finaliser.
;;
;; Examples (pinned by udf-wasm/tests/examples.rs):
;;   "acme:42"                  -> 0x7860b3c2_28ec2cbd
;;   int8 (7 << 32) | 1         -> 0x18c9aec4_514e28b7
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

  (func $fnv1a32 (param $p i32) (param $n i32) (result i32)
    (local $h i32) (local $end i32)
    (local.set $h (i32.const 0x811c9dc5))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (local.set $h
          (i32.mul (i32.xor (local.get $h) (i32.load8_u (local.get $p)))
                   (i32.const 0x01000193)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (local.get $h))

  (func $fmix32 (param $h i32) (result i32)
    (local.set $h (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 16))))
    (local.set $h (i32.mul (local.get $h) (i32.const 0x85ebca6b)))
    (local.set $h (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 13))))
    (local.set $h (i32.mul (local.get $h) (i32.const 0xc2b2ae35)))
    (i32.xor (local.get $h) (i32.shr_u (local.get $h) (i32.const 16))))

  ;; Big-endian u32 at $p.
  (func $be32 (param $p i32) (result i32)
    (i32.or
      (i32.or (i32.shl (i32.load8_u (local.get $p)) (i32.const 24))
              (i32.shl (i32.load8_u offset=1 (local.get $p)) (i32.const 16)))
      (i32.or (i32.shl (i32.load8_u offset=2 (local.get $p)) (i32.const 8))
              (i32.load8_u offset=3 (local.get $p)))))

  (func $join (param $hi i32) (param $lo i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $hi)) (i64.const 32))
            (i64.extend_i32_u (local.get $lo))))

  (func (export "hr_route") (param $oid i32) (param $p i32) (param $n i32) (result i64)
    (local $i i32) (local $rest i32)
    ;; text (OID 25): split at the first ':'
    (if (i32.eq (local.get $oid) (i32.const 25))
      (then
        (block $found
          (loop $scan
            (br_if $found (i32.ge_u (local.get $i) (local.get $n)))
            (br_if $found
              (i32.eq (i32.load8_u (i32.add (local.get $p) (local.get $i)))
                      (i32.const 58)))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $scan)))
        ;; rest = bytes after the ':' (none when there is no ':')
        (local.set $rest
          (select (i32.sub (local.get $n) (i32.add (local.get $i) (i32.const 1)))
                  (i32.const 0)
                  (i32.lt_u (local.get $i) (local.get $n))))
        (return
          (call $join
            (call $fmix32 (call $fnv1a32 (local.get $p) (local.get $i)))
            (call $fmix32
              (call $fnv1a32
                (i32.add (local.get $p) (i32.add (local.get $i) (i32.const 1)))
                (local.get $rest)))))))
    ;; int8 (OID 20): 8 bytes, big-endian
    (if (i32.and (i32.eq (local.get $oid) (i32.const 20))
                 (i32.eq (local.get $n) (i32.const 8)))
      (then
        (return
          (call $join
            (call $fmix32 (call $be32 (local.get $p)))
            (call $fmix32 (call $be32 (i32.add (local.get $p) (i32.const 4))))))))
    unreachable)
)
