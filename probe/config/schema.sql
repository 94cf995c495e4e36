-- probe's MySQL schema. Safe to run again: every statement is IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS serviceapp (
    id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    appkey VARCHAR(128) NOT NULL,
    description VARCHAR(255) NOT NULL DEFAULT '',
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE KEY uk_serviceapp_appkey (appkey)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE IF NOT EXISTS governance_audit (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    changed_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    changed_by VARCHAR(128) NOT NULL,
    env VARCHAR(64) NOT NULL,
    appkey VARCHAR(128) NOT NULL,
    service VARCHAR(128) NOT NULL,
    node VARCHAR(300) NOT NULL,
    action VARCHAR(32) NOT NULL,
    old_value VARCHAR(1024) NULL,
    new_value VARCHAR(1024) NOT NULL,
    KEY ix_governance_audit_appkey (appkey, changed_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;
