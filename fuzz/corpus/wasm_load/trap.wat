;; trap.wat: a routing function for tests that misbehaves on one key.
;;
;; int8 keys only (other types trap). For key 13 it traps
;; (unreachable);
;; any other key k gets the point bswap64(k) (the key's big-endian bytes
;; loaded little-endian): small keys spread over the top byte of the point.
;; It passes upload validation (the trial calls use key 0).
(module
  (memory (export "memory") 1)
  (func (export "hr_abi_version") (result i32) (i32.const 1))
  (func (export "hr_alloc") (param $len i32) (result i32)
    (select (i32.const 16) (i32.const -1)
            (i32.le_u (local.get $len) (i32.const 65520))))
  (func (export "hr_route") (param $oid i32) (param $p i32) (param $n i32) (result i64)
    (local $v i64)
    (if (i32.or (i32.ne (local.get $oid) (i32.const 20))
                (i32.ne (local.get $n) (i32.const 8)))
      (then unreachable))
    (local.set $v (i64.load (local.get $p)))
    ;; key 13: big-endian 00..0d, loaded little-endian
    (if (i64.eq (local.get $v) (i64.const 0x0d00000000000000))
      (then unreachable))
    (local.get $v)))
