//! Member offsets of kernel structures, read from the kernel's own type information
//! (`/sys/kernel/btf/vmlinux`), so the exec program can follow `linux_binprm` → file → inode on
//! whatever layout this kernel has.
//!
//! Only what that needs: walk the type section, find a struct by name, find a member (through
//! anonymous structs and unions). aya-obj parses BTF too but keeps member offsets private; the
//! other Rust BTF crate is LGPL, which an Apache-2.0 static binary should not take in for 150 lines.

use std::collections::HashMap;

use thiserror::Error;

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF: {0}")]
    Format(String),
    #[error("struct {0} not found in the kernel BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member} in the kernel BTF")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bit field, not a byte-addressable member")]
    BitField { strukt: String, member: String },
}

struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

struct Type {
    kind: u32,
    /// Referenced type for modifiers and typedefs.
    type_id: u32,
    members: Vec<Member>,
}

/// The parsed type section, enough to answer member-offset questions.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id - 1.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| BtfError::Format(format!("truncated at byte {at}")))
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let magic = data
            .get(0..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or_else(|| BtfError::Format("empty".into()))?;
        if magic != MAGIC {
            return Err(BtfError::Format(format!(
                "magic {magic:#x}, expected {MAGIC:#x} (little endian)"
            )));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize, what: &str| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| BtfError::Format(format!("{what} section out of bounds")))
        };
        let type_bytes = section(type_off, type_len, "type")?;
        let strings = section(str_off, str_len, "string")?.to_vec();
        let mut btf = Btf {
            strings,
            types: Vec::new(),
            structs: HashMap::new(),
        };
        let mut at = 0;
        while at < type_bytes.len() {
            let name_off = u32_at(type_bytes, at)?;
            let info = u32_at(type_bytes, at + 4)?;
            let size_or_type = u32_at(type_bytes, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_bytes, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(type_bytes, m)?,
                            type_id: u32_at(type_bytes, m + 4)?,
                            // With kind_flag the top 8 bits hold a bit-field size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                k if k <= KIND_TYPE_TAG => 0,
                k => return Err(BtfError::Format(format!("unknown type kind {k}"))),
            };
            at += extra;
            if kind == KIND_STRUCT && vlen > 0 {
                let name = btf.name(name_off).to_string();
                let id = btf.types.len() as u32 + 1;
                btf.structs.entry(name).or_insert(id);
            }
            btf.types.push(Type {
                kind,
                type_id: size_or_type,
                members,
            });
        }
        Ok(btf)
    }

    /// Reads `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> anyhow::Result<Btf> {
        use anyhow::Context as _;
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        Btf::parse(&data).with_context(|| format!("parsing {path}"))
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// Follows typedefs and qualifiers to the struct or union they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.type_id
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `member` in `t`, searching anonymous structs and unions too.
    fn find(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        for m in &t.members {
            if m.name_off != 0 && self.name(m.name_off) == member {
                return Some(m.bit_offset);
            }
        }
        if depth > 8 {
            return None;
        }
        t.members.iter().filter(|m| m.name_off == 0).find_map(|m| {
            let inner = self.resolve(m.type_id)?;
            if !matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                return None;
            }
            Some(m.bit_offset + self.find(inner, member, depth + 1)?)
        })
    }

    /// Byte offset of `strukt.member`.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .structs
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let t = self
            .get(*id)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let bits = self.find(t, member, 0).ok_or_else(|| BtfError::NoMember {
            strukt: strukt.to_string(),
            member: member.to_string(),
        })?;
        if bits % 8 != 0 {
            return Err(BtfError::BitField {
                strukt: strukt.to_string(),
                member: member.to_string(),
            });
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct inner { int a; int b; }`, `struct outer { long x; union { int y;
    /// struct inner in; }; int z:3; }` and a typedef.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0y\0in\0z\0";
        let s = |name: &str| -> u32 {
            let pat = format!("\0{name}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .map(|p| p as u32 + 1)
                .unwrap()
        };
        let mut t: Vec<u32> = Vec::new();
        // 1: int
        t.extend([s("int"), KIND_INT << 24, 4, 32]);
        // 2: struct inner { a@0, b@32 }
        t.extend([s("inner"), (KIND_STRUCT << 24) | 2, 8]);
        t.extend([s("a"), 1, 0, s("b"), 1, 32]);
        // 3: typedef inner_t = 2
        t.extend([0, KIND_TYPEDEF << 24, 2]);
        // 4: anonymous union { y@0, in@0 }
        t.extend([0, (KIND_UNION << 24) | 2, 8]);
        t.extend([s("y"), 1, 0, s("in"), 3, 0]);
        // 5: struct outer, kind_flag set: { x@0, anon@64, z:3@128 }
        t.extend([s("outer"), (1 << 31) | (KIND_STRUCT << 24) | 3, 24]);
        t.extend([s("x"), 1, 0, 0, 4, 64, s("z"), 1, (3 << 24) | 129]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        out.extend(24u32.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((types.len() as u32).to_le_bytes());
        out.extend((types.len() as u32).to_le_bytes());
        out.extend((strings.len() as u32).to_le_bytes());
        out.extend(&types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("outer", "x"), Ok(0));
        assert_eq!(btf.member_offset("outer", "y"), Ok(8));
        assert_eq!(btf.member_offset("outer", "in"), Ok(8));
        assert_eq!(btf.member_offset("inner", "b"), Ok(4));
        assert_eq!(
            btf.member_offset("outer", "z"),
            Err(BtfError::BitField {
                strukt: "outer".into(),
                member: "z".into()
            })
        );
        assert!(matches!(
            btf.member_offset("outer", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("nope", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn bad_blobs_are_errors() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0, 0, 0, 0]).is_err());
        let mut b = blob();
        b.truncate(40);
        assert!(Btf::parse(&b).is_err());
    }

    /// The machine's own kernel, when it publishes BTF (readable without privileges).
    #[test]
    fn this_kernel_has_the_members_the_exec_program_follows() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no /sys/kernel/btf/vmlinux: skipped");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        for (s, m) in [
            ("linux_binprm", "file"),
            ("linux_binprm", "filename"),
            ("linux_binprm", "interp"),
            ("file", "f_inode"),
            ("inode", "i_ino"),
            ("inode", "i_sb"),
            ("super_block", "s_dev"),
            ("task_struct", "cred"),
            ("cred", "user_ns"),
            ("user_namespace", "ns"),
            ("ns_common", "inum"),
        ] {
            btf.member_offset(s, m)
                .unwrap_or_else(|e| panic!("{s}.{m}: {e}"));
        }
    }
}
