struct Inner { 1: i32 a, 2: string s, 3: bool b, 20: i64 far }
struct Big {
  1: bool b1, 2: byte y, 3: i16 h, 4: i32 i, 5: i64 l, 6: double d, 7: string s, 8: binary bn,
  9: list<i32> li, 10: set<string> ss, 11: map<string, i64> m, 12: Inner inner,
  13: list<Inner> lin, 17: bool b2, 40: string farstr, 100: i16 farh, 300: i64 farl,
  301: list<bool> lb, 302: map<i32, Inner> mi, 303: bool b3, 1000: binary farbin
}
